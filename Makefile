# The README's two commands are `make demo` and `make test`; every target sets itself up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow bench lint
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m fxquant demo

test: setup
	$(PY) -m ruff check fxquant passes recipes tests benchmarks
	$(PY) -m pytest -m "not slow" -q

test-slow: setup
	# two processes: the export families and the model zoo together outgrew 20 GB in one
	$(PY) -m pytest -m slow -q --ignore=tests/test_zoo.py
	$(PY) -m pytest -m slow -q tests/test_zoo.py

# Each benchmark prints its table and writes benchmarks/results/; the list lives in benchmarks/suite.py (the
# commands of the committed results, each also printed at the top of its results file). Most of a day on 2 cores.
bench: setup
	$(PY) benchmarks/suite.py

lint: setup
	$(PY) -m ruff check fxquant passes recipes tests benchmarks
