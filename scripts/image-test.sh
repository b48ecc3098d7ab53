#!/usr/bin/env bash
# Run the fetchpool image for real (podman, runc, host network, loopback addresses only):
#   1. image metadata: numeric non-root USER, ENTRYPOINT ["fetchpool"], CMD ["serve"];
#   2. `fetchpool --help` and `fetchpool operator --help` run; no compiler or make in the image; the
#      venv holds only uv.lock's runtime pins (`uv export --no-dev`): no grpcio-tools, no dev tools;
#   3. `fetchpool serve` (the default command) under the chart's hardening (--read-only root,
#      /tmp tmpfs, --cap-drop ALL, no-new-privileges, UID 10001) on 127.0.0.1:<free port>;
#      gRPC health checked from the host ("" and fetchpool.v1.FetchService);
#   4. `fetchpool fetch` from a second container fetches a page served on 127.0.0.1 by the host;
#   5. the chart's `helm test` program runs inside the image against that server;
#   6. SIGTERM (podman stop) drains and exits 0 within the chart's grace period.
#
#   scripts/image-test.sh          # tests localhost/fetchpool:<version>, building it if missing
#   IMAGE=... scripts/image-test.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VERSION="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
IMAGE="${IMAGE:-localhost/fetchpool:${VERSION}}"
NAME="fetchpool-image-test-$$"
export CONTAINERS_CONF="$ROOT/.cache/podman/containers.conf"
export PATH="$PATH:/usr/sbin:/sbin"

log() { printf 'image-test: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
failures=0
check_failed() { log "FAIL: $*"; failures=$((failures + 1)); }  # go on with the other checks

if ! command -v podman >/dev/null 2>&1 || [[ ! -f "$CONTAINERS_CONF" ]] || ! podman image exists "$IMAGE"; then
    log "$IMAGE not built yet: scripts/image-build.sh"
    IMAGE="$IMAGE" "$ROOT/scripts/image-build.sh"
fi

http_pid=""
webroot="$(mktemp -d)"
cleanup() {
    podman rm -f "$NAME" >/dev/null 2>&1 || true
    if [[ -n "$http_pid" ]]; then kill "$http_pid" 2>/dev/null || true; fi
    rm -rf "$webroot"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- 1. metadata --------------------------------------------------------------------------------
user="$(podman image inspect --format '{{.Config.User}}' "$IMAGE")"
entrypoint="$(podman image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")"
cmd="$(podman image inspect --format '{{json .Config.Cmd}}' "$IMAGE")"
[[ "$user" =~ ^[1-9][0-9]*(:[0-9]+)?$ ]] || fail "USER is '$user', want a numeric non-root UID"
[[ "$entrypoint" == '["fetchpool"]' ]] || fail "ENTRYPOINT is $entrypoint"
[[ "$cmd" == '["serve"]' ]] || fail "CMD is $cmd"
log "ok: USER $user, ENTRYPOINT $entrypoint, CMD $cmd, $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

# --- 2. --help, no build tools -------------------------------------------------------------------
help="$(podman run --rm --network none "$IMAGE" --help)" || fail "fetchpool --help exited $?"
if ! grep -q "serve" <<<"$help" || ! grep -q "operator" <<<"$help"; then
    fail "fetchpool --help lacks serve/operator: $help"
fi
log "ok: fetchpool --help"
if podman run --rm --network none "$IMAGE" operator --help >/dev/null 2>&1; then
    log "ok: fetchpool operator --help"
else
    check_failed "fetchpool operator --help: $(podman run --rm --network none "$IMAGE" operator --help 2>&1 | tail -n 1)"
fi
tools="$(podman run --rm --network none --entrypoint /bin/sh "$IMAGE" -c \
    'for t in gcc cc c++ g++ make ld; do command -v "$t"; done; true')"
[[ -z "$tools" ]] || fail "build tools in the runtime image: $tools"
log "ok: no compiler, make or linker on PATH"

# --- 2b. the venv holds the lock's runtime set and nothing else (no grpcio-tools, no test tools) ---
# What the image has: name==version of every distribution in /opt/venv. What it may have: the
# runtime dependencies uv.lock pins (`uv export --no-dev`), plus fetchpool itself.
installed="$(podman run --rm --network none --entrypoint python3 "$IMAGE" -c '
import importlib.metadata as m, re
for d in m.distributions():
    print(re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() + "==" + d.version)' | sort -u)"
grep -q '^grpcio-tools==' <<<"$installed" && fail "grpcio-tools is in the image (a build-group tool)"
podman run --rm --network none --entrypoint python3 "$IMAGE" -c 'import grpc_tools' >/dev/null 2>&1 \
    && fail "grpc_tools is importable in the image"
UV_BIN="$ROOT/.venv/bin/uv"
if [[ -x "$UV_BIN" ]]; then
    allowed="$("$UV_BIN" export --locked --no-dev --no-emit-project --no-hashes --format requirements-txt \
        | python3 -c '
import re, sys
for line in sys.stdin:
    match = re.match(r"([A-Za-z0-9._-]+)==([^ ;]+)", line)
    if match:
        print(re.sub(r"[-_.]+", "-", match[1]).lower() + "==" + match[2])' | sort -u)"
    extra="$(comm -23 <(grep -v '^fetchpool==' <<<"$installed") <(printf "%s\n" "$allowed"))"
    [[ -z "$extra" ]] || fail "in the image but not among uv.lock's runtime pins (uv export --no-dev): $(tr '\n' ' ' <<<"$extra")"
    log "ok: the venv is uv.lock's runtime set ($(wc -l <<<"$installed") distributions; no grpcio-tools, no dev tools)"
else
    log "ok: no grpcio-tools (no host venv: the lock comparison needs make install)"
fi

# --- 3. serve, hardened, health from the host ---------------------------------------------------
port="$(free_port)"
podman run -d --name "$NAME" --network host \
    --read-only --tmpfs /tmp:rw,size=64m --cap-drop ALL --security-opt no-new-privileges \
    --user 10001:10001 \
    -e FETCHPOOL_LISTEN="127.0.0.1:$port" -e FETCHPOOL_GRACE_PERIOD=25 -e OTEL_SDK_DISABLED=true \
    -e FETCHPOOL_ALLOW_TARGETS=127.0.0.0/8 \
    "$IMAGE" >/dev/null
HOSTPY="$ROOT/.venv/bin/python"
health_check() {  # $1 = service name; from the host when the venv exists, else from the image
    local prog='import sys, grpc
from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc as pbg
with grpc.insecure_channel(sys.argv[1]) as ch:
    s = pbg.HealthStub(ch).Check(pb.HealthCheckRequest(service=sys.argv[2]), timeout=2).status
print(pb.HealthCheckResponse.ServingStatus.Name(s)); sys.exit(s != pb.HealthCheckResponse.SERVING)'
    if [[ -x "$HOSTPY" ]]; then
        "$HOSTPY" -c "$prog" "127.0.0.1:$port" "$1"
    else
        podman run --rm --network host --entrypoint python3 "$IMAGE" -c "$prog" "127.0.0.1:$port" "$1"
    fi
}
for _ in $(seq 1 60); do
    health_check "" >/dev/null 2>&1 && break
    [[ "$(podman inspect --format '{{.State.Running}}' "$NAME")" == "true" ]] || break
    sleep 0.5
done
health_check "" >/dev/null 2>&1 || { podman logs "$NAME" >&2; fail "serve never became SERVING"; }
health_check "fetchpool.v1.FetchService" >/dev/null || fail "FetchService not SERVING"
log "ok: fetchpool serve on 127.0.0.1:$port (read-only root, no capabilities, UID 10001): health SERVING"

# --- 4. a fetch through the containerised CLI -------------------------------------------------------
hport="$(free_port)"
echo "hello from the image test" >"$webroot/hello.txt"
python3 -m http.server "$hport" --bind 127.0.0.1 --directory "$webroot" >/dev/null 2>&1 &
http_pid=$!
for _ in $(seq 1 50); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $hport), 0.2)" 2>/dev/null && break; sleep 0.1; done
out="$(podman run --rm --network host "$IMAGE" fetch "http://127.0.0.1:$hport/hello.txt" \
        --target "127.0.0.1:$port" --body text)" || fail "fetchpool fetch exited $?: $out"
if ! grep -q '"status_code": 200' <<<"$out" || ! grep -q 'hello from the image test' <<<"$out"; then
    fail "unexpected fetch result: $out"
fi
log "ok: fetchpool fetch (container -> server -> 127.0.0.1:$hport) 200"

# --- 5. the chart's helm test program, inside the image -------------------------------------------
if [[ -x "$HOSTPY" ]]; then
    program="$("$HOSTPY" - <<'PY'
import sys
sys.path.insert(0, "tests/chart")
import chartlib
# Self-served page (tests.fetchUrl empty), which the chart allows only with an allow list.
pod = chartlib.render({"tests": {"fetchUrl": ""}, "ssrf": {"allowTargets": ["127.0.0.0/8"]}}).get(
    "Pod", "demo-fetchpool-test")
print(pod["spec"]["containers"][0]["command"][2])
PY
)"
    tport="$(free_port)"
    out="$(podman run --rm --network host --read-only --tmpfs /tmp --cap-drop ALL --user 10001:10001 \
            -e FP_TARGET="127.0.0.1:$port" -e FP_POD_IP=127.0.0.1 -e FP_HTTP_PORT="$tport" \
            --entrypoint python3 "$IMAGE" -c "$program")" || fail "helm test program exited $?: $out"
    [[ "$(tail -n 1 <<<"$out")" == "ok" ]] || fail "helm test program: $out"
    log "ok: the chart's helm test program (health + one fetch) passes in the image"
fi

# --- 6. SIGTERM drain ----------------------------------------------------------------------------
start=$SECONDS
podman stop --time 40 "$NAME" >/dev/null
took=$((SECONDS - start))
code="$(podman inspect --format '{{.State.ExitCode}}' "$NAME")"
[[ "$code" == "0" ]] || { podman logs "$NAME" >&2; fail "exit code $code after SIGTERM"; }
((took < 30)) || fail "stop took ${took}s (chart grace: 40s)"
log "ok: SIGTERM -> drained and exited 0 in ${took}s"
if ((failures > 0)); then
    log "$failures check(s) failed for $IMAGE"
    exit 1
fi
log "all image checks passed for $IMAGE"
