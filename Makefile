# Pegasus: `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PG_URL ?= postgres://postgres@127.0.0.1:5432/postgres
# WebSocket messages up to 4 MiB reach Pegasus, which answers frames over its own limit
# (PEGASUS_WS_MAX_FRAME_BYTES, 1 MiB + 64 KiB) with an error frame (docs/websocket.md).
DAPHNE_WS_LIMITS ?= --websocket-max-message-size 4194304 --websocket-max-frame-size 4194304

.PHONY: help run test test-pg lint fmt bench bench-smoke faults install
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install everything from pyproject.toml

run: $(STAMP) ## migrate the embedded SQLite database, print a login and a token, serve on :8000
	$(PY) manage.py migrate --noinput
	$(PY) manage.py dev_setup
	$(VENV)/bin/daphne -b 127.0.0.1 -p 8000 $(DAPHNE_WS_LIMITS) pegasus_site.asgi:application

test: $(STAMP) ## the whole suite (DATABASE_URL=postgres://... runs it on PostgreSQL)
	$(PY) -m pytest $(PYTEST_ARGS)

test-pg: ## the whole suite on the local PostgreSQL
	DATABASE_URL=$(PG_URL) $(MAKE) test

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

fmt: $(STAMP) ## format the code
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP) ## the full benchmark (5-17 min): PostgreSQL, RabbitMQ and Pegasus side by side, into bench/results/
	$(PY) -m bench.run

bench-smoke: $(STAMP) ## a seconds-long run of the benchmark (CI)
	$(PY) -m bench.run --smoke

FAULTS_RUN = PEGASUS_FAULTS=full PEGASUS_TEST_DB_NAME=test_faults_full $(PY) -m pytest tests/faults -q -rs -o timeout=3600

faults: $(STAMP) ## the full-length fault-injection suite (docs/reliability.md), on SQLite then PostgreSQL
	$(FAULTS_RUN) $(PYTEST_ARGS)
	DATABASE_URL=$(PG_URL) $(FAULTS_RUN) $(PYTEST_ARGS)
