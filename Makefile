# Two commands on a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/sitecloud up $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check roles shared tests bench
	$(BIN)/ruff format --check roles shared tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Bytecode first: the tests start hundreds of role processes, and where PYTHONDONTWRITEBYTECODE is set
# each would compile our modules again.
unit: $(STAMP)
	$(BIN)/python -m compileall -q roles shared tests bench > /dev/null
	$(BIN)/pytest -q -n 2 --dist loadfile --durations=20 $(PYTEST_ARGS)

test: lint typecheck unit

# Data plane against nginx (and under 1,000 slowloris connections), FTP against vsftpd, publish to served in a big site, then dynamic sites: cold starts, density, warm req/s vs gunicorn.
bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)
	$(BIN)/python -m bench.slowloris
	$(BIN)/python -m bench.ftp
	$(BIN)/python -m bench.publish
	$(BIN)/python -m bench.coldstart
	$(BIN)/python -m bench.density
	$(BIN)/python -m bench.warm

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
