# fetchpool: `make help` lists the targets. Everything runs from a venv in .venv.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Test files run in parallel workers (pytest-xdist; a file's tests stay in one worker, so its
# module-scoped servers start once). Most tests wait on real servers and sockets, not the CPU:
# three workers on two cores bring make test from ~15 to ~5 minutes. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 3
# The installer: this version bootstraps the venv, and the lock pins the same one
# (tests/unit/test_contract.py checks they agree). Change both with `make lock-upgrade`.
UV_VERSION := 0.13.9
UV := UV_PROJECT_ENVIRONMENT=$(VENV) UV_PYTHON_DOWNLOADS=never $(BIN)/uv

.PHONY: help install lock lock-upgrade system-deps proto run test lint bench bench-smoke bench-telemetry image image-test chart-lint chart-test clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"

# Every run syncs the venv to the lock exactly (a no-op when it already is): what is installed is
# what uv.lock says, whatever was installed by hand before. --locked refuses a lock that no longer
# matches pyproject.toml (run `make lock`).
install: $(BIN)/uv ## create .venv and install exactly what uv.lock pins (the service, test, lint, bench, build tools)
	$(UV) sync --locked --all-groups --python $(BIN)/python

lock: $(BIN)/uv ## refresh uv.lock after editing pyproject.toml (keeps every other pin as it is)
	$(UV) lock

lock-upgrade: $(BIN)/uv ## move every pin to the newest release its range allows (then: make test, commit uv.lock)
	$(UV) lock --upgrade

system-deps: ## install the Debian packages the tests use (nginx, tinyproxy, squid, wrk, ...)
	bash scripts/install-system-deps.sh

proto: install ## regenerate the gRPC stubs in service/fetchpool/v1 from proto/
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=service --pyi_out=service \
	    --grpc_python_out=service proto/fetchpool/v1/fetch.proto

run: install ## start the service on embedded defaults (127.0.0.1:50051, direct, no telemetry)
	$(BIN)/fetchpool serve

test: install system-deps ## run every test (unit, integration against real servers, chart, bench smoke)
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install ## ruff, mypy and the import contract (lint-imports)
	$(BIN)/ruff check service tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install system-deps ## full benchmark vs the alternatives (prints a table, writes JSON and a PNG)
	$(BIN)/python -m bench

bench-smoke: install system-deps ## a few-second benchmark run (also part of make test)
	$(BIN)/python -m bench --smoke

bench-telemetry: install system-deps ## throughput with telemetry off vs on (metrics, spans, phases), same run
	$(BIN)/python bench/telemetry_overhead.py -n 3000 -c 64 --rounds 7

image: ## build the container image with podman (base from debootstrap when no registry)
	bash scripts/image-build.sh

image-test: image ## run the image: fetchpool --help and a health check
	bash scripts/image-test.sh

chart-lint: install ## helm lint --strict and schema validation of the chart
	bash scripts/chart-test.sh --lint

chart-test: install ## render, lint and validate the chart for every ci/*-values.yaml
	bash scripts/chart-test.sh

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
