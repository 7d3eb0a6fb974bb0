# taskapp — the two commands: `make run` (whole stack, embedded services) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench chaos lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

## Start PostgreSQL + Redis (embedded unless TASKAPP_DATABASE_URL/TASKAPP_REDIS_URL are set),
## migrate, and serve the API on http://127.0.0.1:8000 in the foreground.
run: install
	$(BIN)/taskapp run

## The full test suite against real PostgreSQL and Redis (local ones if they answer, else embedded).
test: install
	$(BIN)/pytest

## Load benchmark (needs wrk): seeds 1M tasks, serves them as production does, prints the table.
## BENCH_ARGS="--quick" for a smoke run; `.venv/bin/python -m bench --help` lists the options.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

## Faults under load (real PostgreSQL, Redis, nginx stopped and started): one table per scenario.
## CHAOS_ARGS="--scenarios postgres,redis --duration 6"; `.venv/bin/python -m reliability.chaos --help`.
chaos: install
	$(BIN)/python -m reliability.chaos $(CHAOS_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy taskapp tests bench reliability

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
