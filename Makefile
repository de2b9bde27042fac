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
	$(PY) -m pytest -m slow -q

# Each benchmark prints its table and writes benchmarks/results/; together they take a few hours on 2 cores.
bench: setup
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/accuracy.py --quick
	$(PY) benchmarks/accuracy.py --quick --recipes features_short --qat-epochs 1 --tag features
	$(PY) benchmarks/coreset.py --quick
	$(PY) benchmarks/zeroshot.py
	$(PY) benchmarks/sharpness.py

lint: setup
	$(PY) -m ruff check fxquant passes recipes tests benchmarks
