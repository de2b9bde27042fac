#!/usr/bin/env bash
# The device checks, in one run on a machine with a CUDA GPU: install this checkout into a scratch folder (no
# dependency is fetched: the machine's torch, Triton and friends are used; wheels in .whl/ are added), run the `gpu`
# test suite and benchmarks/gpu_overhead.py, and leave logs and results in $OUT (default ./gpu-out).
#
#   FXQUANT_COMMIT=$(git rev-parse --short=12 HEAD) bash scripts/gpu_checks.sh
#
# Fashion-MNIST is read from $FXQUANT_DATA, else .gpu/fashion-mnist (a copy of Debian's dataset-fashion-mnist files,
# for machines that cannot install it). Each stage has a time limit (TEST_SECONDS, BENCH_SECONDS, COMPILED_SECONDS)
# so that the whole run fits a lease; a stage that runs out still leaves what it wrote.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
SITE=/tmp/fxquant-site
rm -rf "$SITE"
python3 -m pip install -q --no-deps --no-build-isolation --target "$SITE" . 2>&1 | tail -3
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl 2>&1 | tail -3
fi
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/fxquant-inductor
if [ -z "${FXQUANT_DATA:-}" ] && [ -d .gpu/fashion-mnist ]; then export FXQUANT_DATA=$PWD/.gpu/fashion-mnist; fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"

# the tests run from a copy of tests/ so that `import fxquant` is the installed package, not the source folders
RUN=/tmp/fxquant-tests
rm -rf "$RUN" && mkdir -p "$RUN" && cp -r tests "$RUN/"
(cd "$RUN" && timeout "${TEST_SECONDS:-200}" python3 -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider \
    --durations=12 2>&1) | tee "$OUT/tests.log"

timeout "${BENCH_SECONDS:-220}" python3 benchmarks/gpu_overhead.py --compiled '' --rounds 6 --budget 150 \
    ${BENCH_MODELS:+--models "$BENCH_MODELS"} 2>&1 | tee "$OUT/bench.log"
cp benchmarks/results/gpu_overhead.md "$OUT/gpu_overhead_eager.md" 2>/dev/null
cp benchmarks/results/gpu_overhead.json "$OUT/gpu_overhead_eager.json" 2>/dev/null

timeout "${COMPILED_SECONDS:-150}" python3 benchmarks/gpu_overhead.py --models "" --compiled llama \
    --modes traced_forward,op --rounds 6 --merge benchmarks/results/gpu_overhead.json 2>&1 | tee "$OUT/compiled.log"
cp benchmarks/results/gpu_overhead.md "$OUT/gpu_overhead_compiled.md" 2>/dev/null
cp benchmarks/results/gpu_overhead.json "$OUT/gpu_overhead_compiled.json" 2>/dev/null
echo "gpu_checks done"
