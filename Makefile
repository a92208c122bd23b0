# gyoza — one entry point for set-up, code generation, checks, tests and benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install proto proto-check lint services test bench bench-replicas serve screenshots all clean

all: lint proto-check test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Regenerate the Python code (and .pyi stubs) for the v1 API. The proto path is the
# import path, so the output needs no rewriting.
PROTOC = $(PY) -m grpc_tools.protoc -Iprotos \
	--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
	--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc
PROTOS = $$(find protos/gyoza -name '*.proto' | sort)

proto: $(STAMP)
	$(PROTOC) --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=. $(PROTOS)

proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && \
	$(PROTOC) --python_out=$$tmp --mypy_out=$$tmp --grpc_python_out=$$tmp --mypy_grpc_out=$$tmp \
		$(PROTOS) && \
	diff -r -x __init__.py -x __pycache__ -x '*.pyc' $$tmp/gyoza/api/v1 gyoza/api/v1 && \
	rm -rf $$tmp && echo "generated code is up to date"

# The wire contract is checked against the main branch (`buf breaking`): on main itself
# it compares with itself and passes. BUF_AGAINST names another baseline (a buf input,
# relative to protos/). The import rules of docs/architecture.md are import-linter
# contracts in pyproject.toml.
BUF_AGAINST ?= ../.git\#branch=main,subdir=protos

lint: $(STAMP)
	$(VENV)/bin/ruff check gyoza tests bench
	$(VENV)/bin/ruff format --check gyoza tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	cd protos && ../$(VENV)/bin/buf lint
	cd protos && ../$(VENV)/bin/buf breaking --against '$(BUF_AGAINST)'

# Start what the tests need: the Docker engine, a throwaway PostgreSQL on
# 127.0.0.1 (port GYOZA_PG_PORT, default 54329) and the test image gyoza-test/busybox:latest.
# As root on a machine that lacks the system packages, install them first. The
# PostgreSQL URL is left in .tmp/postgres-url for `test`.
services:
	@if [ "$$(id -u)" = 0 ] && { ! command -v dockerd >/dev/null 2>&1 || \
		! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		! test -x /bin/busybox; }; then scripts/install-system.sh; fi
	scripts/start-dockerd.sh
	@mkdir -p .tmp
	scripts/start-postgres.sh > .tmp/postgres-url
	scripts/make-test-image.sh

# GYOZA_TEST_POSTGRES_URL from the environment wins over the local cluster's URL.
test: $(STAMP) services
	GYOZA_TEST_POSTGRES_URL="$${GYOZA_TEST_POSTGRES_URL:-$$(cat .tmp/postgres-url)}" \
		$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) -m bench
	$(PY) -m bench.placement

# Replicas on PostgreSQL (the local test cluster unless GYOZA_BENCH_POSTGRES_URL is set).
bench-replicas: $(STAMP) services
	GYOZA_BENCH_POSTGRES_URL="$${GYOZA_BENCH_POSTGRES_URL:-$$(cat .tmp/postgres-url)}" \
		$(PY) -m bench.replicas

# A PNG of each page of the web dashboard under docs/ui/ (needs chromium and chromedriver:
# scripts/install-system.sh installs them).
screenshots: $(STAMP)
	$(PY) scripts/screenshots.py

# Start the server on its embedded default: a SQLite file in the working directory.
serve: $(STAMP)
	$(VENV)/bin/gyoza server

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
