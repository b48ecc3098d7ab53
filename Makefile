# fetchpool: `make help` lists the targets. Everything runs from a venv in .venv.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install system-deps proto proto-check run test lint bench bench-smoke bench-telemetry image image-test chart-lint chart-test clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install fetchpool with its test and bench extras

system-deps: ## install the Debian packages the tests use (nginx, tinyproxy, squid, wrk, ...)
	bash scripts/install-system-deps.sh

proto: $(STAMP) ## regenerate the gRPC stubs in service/fetchpool/v1 from proto/
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=service --pyi_out=service \
	    --grpc_python_out=service proto/fetchpool/v1/fetch.proto

run: install ## start the service on embedded defaults (127.0.0.1:50051, direct, no telemetry)
	$(BIN)/fetchpool serve

test: install system-deps ## run every test (unit, integration against real servers, chart, bench smoke)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install ## ruff and mypy
	$(BIN)/ruff check service tests bench
	$(BIN)/mypy

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
