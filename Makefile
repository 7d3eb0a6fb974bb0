# taskapp — the two commands: `make run` (whole stack, embedded services) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench chaos fuzz soak lint audit format clean

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

## The edit loop: everything but the `slow` tests (several processes, faults, long runs).
test-fast: install
	$(BIN)/pytest -m "not slow"

## Load benchmark (needs wrk): seeds 1M tasks, serves them as production does, prints the table.
## BENCH_ARGS="--quick" for a smoke run; `.venv/bin/python -m bench --help` lists the options.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

## Faults under load (real PostgreSQL, Redis, nginx stopped and started): one table per scenario.
## CHAOS_ARGS="--scenarios postgres,redis --duration 6"; `.venv/bin/python -m reliability.chaos --help`.
chaos: install
	$(BIN)/python -m reliability.chaos $(CHAOS_ARGS)

## Hostile input (Schemathesis): `taskapp serve` as in production, every operation of its own
## /openapi.json with a user and an admin token, plus malformed bodies; prints the figures.
## FUZZ_ARGS="--cases 10000 --seed 1" to change the run; `.venv/bin/python -m reliability.fuzz --help`.
fuzz: install
	$(BIN)/python -m reliability.fuzz $(FUZZ_ARGS)

## Sustained load (needs wrk): 10 minutes of mixed traffic at a fixed rate against 2 workers;
## fails on any error, RSS growth, DB connections over the pools, or p99 drift.
## SOAK_ARGS="--duration 120" for a shorter run; `.venv/bin/python -m reliability.soak --help`.
soak: install
	$(BIN)/python -m reliability.soak $(SOAK_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy taskapp testing tests bench reliability
	$(BIN)/bandit --quiet --configfile pyproject.toml --recursive taskapp testing bench reliability

## Known vulnerabilities in the pinned dependencies (needs the PyPI JSON API or OSV; fails
## on any dependency it could not check).
audit: install
	$(BIN)/python -m pip install --quiet pip-audit==2.10.1
	$(BIN)/pip-audit --strict --requirement requirements.lock

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .venv-ceiling .pytest_cache .mypy_cache .ruff_cache
