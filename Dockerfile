# syntax=docker/dockerfile:1
#
# fetchpool image: one image for both components.
#   service:  fetchpool serve      (the default: ENTRYPOINT ["fetchpool"], CMD ["serve"])
#   operator: fetchpool operator   (the chart sets args: ["operator", ...])
#
# Build:   make image            (scripts/image-build.sh: podman, --network host)
#          docker build -t fetchpool:dev .
# A local base (for machines without registry access):
#          podman build --build-arg BASE_IMAGE=localhost/fetchpool-base:bookworm ...
#
# BASE_IMAGE must provide python3 (>= 3.11) with the venv module. Both stages use the same base, so
# the virtualenv built in the first stage runs unchanged in the second. Pin it by digest where a
# registry is reachable, e.g. docker.io/library/python:3.11.14-slim-bookworm@sha256:<digest>.
ARG BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm

############################################################################
# Stage 1: install the locked dependencies and the project into a venv.
############################################################################
FROM ${BASE_IMAGE} AS builder

# The installer, at the version the lock pins (tests/unit/test_dependencies.py checks they agree).
ARG UV_VERSION=0.13.9
# Optional CA bundle for the installers, for networks that reach PyPI through a TLS-intercepting
# proxy. scripts/image-build.sh mounts the host's bundle with `--volume` for the build only and
# passes its path here; nothing of it is copied into any layer. Unset by default (the tools' own
# CA stores).
ARG PIP_CERT

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv

WORKDIR /src

# The installer in a throw-away venv; it never reaches the runtime stage.
RUN python3 -m venv /opt/uv \
 && /opt/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}"

# Dependencies first, from the lock alone: this layer is rebuilt only when the lock changes, not on
# every source change. --locked: the exact versions and hashes of uv.lock, the same set `make test`
# ran against; --no-dev: runtime dependencies only (no test tools, no grpcio-tools). README.md is
# optional: the glob keeps COPY from failing while it does not exist.
COPY pyproject.toml uv.lock README.m[d] ./
RUN if [ -n "${PIP_CERT:-}" ]; then export SSL_CERT_FILE="$PIP_CERT"; fi \
 && /opt/uv/bin/uv sync --locked --no-dev --no-install-project --python python3

# The project itself, not editable: the venv holds a copy and needs no sources. The gRPC stubs are
# the committed ones (a test keeps them in step with proto/), so no code generator runs here.
COPY service/ service/
RUN if [ -n "${PIP_CERT:-}" ]; then export SSL_CERT_FILE="$PIP_CERT"; fi \
 && /opt/uv/bin/uv sync --locked --no-dev --no-editable --python python3

# A numeric, non-root user for the runtime stage (Kubernetes' runAsNonRoot can only verify a
# numeric UID). The entries are written directly because minimal bases may lack useradd.
RUN echo "fetchpool:x:10001:10001:fetchpool:/nonexistent:/usr/sbin/nologin" >> /etc/passwd \
 && echo "fetchpool:x:10001:" >> /etc/group

############################################################################
# Stage 2: runtime. The base image plus the venv: no compiler, no sources, no build files.
############################################################################
FROM ${BASE_IMAGE} AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="fetchpool" \
      org.opencontainers.image.description="gRPC fetch service over one pooled HTTP/2 httpx client, and its operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# The user made in the first stage (same base, so the files differ only by that line) and the venv.
# No RUN step here: nothing of the build environment can reach this stage.
COPY --from=builder /etc/passwd /etc/group /etc/
COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    FETCHPOOL_LISTEN=0.0.0.0:50051

USER 10001:10001
WORKDIR /tmp
EXPOSE 50051

ENTRYPOINT ["fetchpool"]
CMD ["serve"]
