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
# Stage 1: generate the gRPC stubs, build wheels, install them into a venv.
############################################################################
FROM ${BASE_IMAGE} AS builder

# grpcio-tools that generates the stubs: keep in step with the stubs checked in under
# service/fetchpool/v1 (their header names the version that made them).
ARG GRPCIO_TOOLS_VERSION=1.85.1
# Optional CA bundle for pip, for networks that reach PyPI through a TLS-intercepting proxy.
# scripts/image-build.sh mounts the host's bundle with `--volume` for the build only and passes its
# path here; nothing of it is copied into any layer. Unset by default (pip's own CA store).
ARG PIP_CERT

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# A throw-away venv for the code generator; it never reaches the runtime stage.
RUN python3 -m venv /opt/codegen \
 && /opt/codegen/bin/pip install --no-cache-dir "grpcio-tools==${GRPCIO_TOOLS_VERSION}"

# Dependency wheels first, from pyproject.toml alone: this layer is rebuilt only when the
# dependencies change, not on every source change. (README.md is optional: the glob keeps COPY
# from failing while it does not exist.)
COPY pyproject.toml README.m[d] ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt \
 && /opt/codegen/bin/pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.txt

COPY proto/ proto/
COPY service/ service/

# Regenerate the stubs from the .proto so the image never ships stubs older than the API.
RUN /opt/codegen/bin/python -m grpc_tools.protoc -I proto \
        --python_out=service --pyi_out=service --grpc_python_out=service \
        proto/fetchpool/v1/fetch.proto \
 && touch service/fetchpool/v1/__init__.py

# The project's wheel, then a clean venv from the wheels alone (no index in the install step:
# what was built is what is installed). The venv keeps no pip.
RUN /opt/codegen/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels fetchpool \
 && /opt/venv/bin/pip uninstall --yes pip

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
