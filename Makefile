# The README's two commands are `make demo` and `make test`; every target sets itself up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow docs docs-build bench bench-gpu bench-peers fp-checkpoint lint
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m fxquant demo

test: setup
	$(PY) -m ruff check fxquant passes recipes tests benchmarks
	$(PY) -m pytest -m "not slow" -q
	$(MAKE) --no-print-directory docs-build

# The docs site (docs/, mkdocs.yml) into site/: strict, so a broken link or reference fails the build.
docs: setup docs-build

docs-build:
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

test-slow: setup
	# two processes: the export families and the model zoo together outgrew 20 GB in one
	$(PY) -m pytest -m slow -q --ignore=tests/test_zoo.py
	$(PY) -m pytest -m slow -q tests/test_zoo.py

# Each benchmark prints its table and writes benchmarks/results/; the list lives in benchmarks/suite.py (the
# commands of the committed results, each also printed at the top of its results file). Most of a day on 2 cores.
bench: setup
	$(PY) benchmarks/suite.py

# On a machine with a CUDA GPU: the gpu test suite and benchmarks/gpu_overhead.py (see scripts/gpu_checks.sh).
bench-gpu:
	bash scripts/gpu_checks.sh

# The train-step overhead against the peers (Brevitas, NNCF, torchao): they live in their own venv (.venv-bench), never
# in fxquant's. Run it alone on the machine: it is a timing benchmark.
bench-peers:
	bash scripts/setup_bench_peers.sh
	.venv-bench/bin/python benchmarks/overhead.py --steps 15 --fit

# The FP resnet20 the demo starts from (fxquant/assets/): the command the shipped file was made with.
fp-checkpoint: setup
	$(PY) -m fxquant train --fp --model resnet20 --recipe lsq_w8a8 --epochs 12 --lr 0.1 --seed 0 \
		--out fxquant/assets/resnet20_fashion_mnist.pt

lint: setup
	$(PY) -m ruff check fxquant passes recipes tests benchmarks
