# gyoza — one entry point for set-up, code generation, checks, tests and benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install proto proto-check lint test bench serve all clean

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

lint: $(STAMP)
	$(VENV)/bin/ruff check gyoza tests bench
	$(VENV)/bin/ruff format --check gyoza tests bench
	$(VENV)/bin/mypy
	cd protos && ../$(VENV)/bin/buf lint

test: $(STAMP)
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) -m bench

# Start the server on its embedded default: a SQLite file in the working directory.
serve: $(STAMP)
	$(VENV)/bin/gyoza server

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
