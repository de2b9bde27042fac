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

# Each benchmark prints its table and writes benchmarks/results/; together they take most of a day on 2 cores
# (the commands of the committed results, each also printed at the top of its results file).
bench: setup
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/accuracy.py --quick
	$(PY) benchmarks/accuracy.py --quick --recipes features_short --qat-epochs 1 --tag features
	$(PY) benchmarks/accuracy.py --quick --recipes lsq_w2a2,fpq_w2a2,mec_w2a2 --qat-epochs 1 --seeds 1,2 --fp-seed 0 \
		--merge benchmarks/results/accuracy_resnet20_quick_features.json --tag features_seeds
	$(PY) benchmarks/accuracy.py --quick --recipes lsq_w4a4,cr_w4a4,mec_w4a4 --qat-epochs 1 --tag features_w4a4
	$(PY) benchmarks/accuracy.py --quick --recipes lsq_w2a2,cr_w2a2,fpq_cr_w2a2 --qat-epochs 1 --tag features_cr_warmup
	for bits in w2a2 w4a4; do $(PY) benchmarks/accuracy.py --quick --model mobilenet_v2_small \
		--recipes lsq_$$bits,fpq_$$bits,mec_$$bits --qat-epochs 1 --set quant.activation.init=mse \
		--tag features_mse_$$bits || exit 1; done
	$(PY) benchmarks/accuracy.py --quick --recipes lsq_w2a2,fpq_w2a2 --qat-epochs 1 --tag features_mse_w2a2
	$(PY) benchmarks/accuracy.py --quick --recipes mec_w2a2 --qat-epochs 1 --tag features_mse_w2a2_mec
	$(PY) benchmarks/accuracy.py --quick --recipes cr_w2a2,fpq_cr_w2a2 --qat-epochs 1 --tag features_mse_w2a2_cr
	$(PY) benchmarks/accuracy.py --quick --recipes lsq_w4a4,fpq_w4a4 --qat-epochs 1 --tag features_mse_w4a4
	$(PY) benchmarks/coreset.py --quick --bits w4a4
	$(PY) benchmarks/coreset.py --quick --bits w2a2 --tag w2a2
	$(PY) benchmarks/zeroshot.py
	$(PY) benchmarks/sharpness.py
	$(PY) benchmarks/sharpness.py --only-budgets --budgets avg3 --methods hessian,sam,saq --search-first-last \
		--saq-iterations 60 --tag budgets_avg3
	$(PY) benchmarks/sharpness.py --only-budgets --budgets avg2 --methods hessian,sam --search-first-last \
		--tag budgets_avg2

lint: setup
	$(PY) -m ruff check fxquant passes recipes tests benchmarks
