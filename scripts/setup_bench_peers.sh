#!/usr/bin/env bash
# The peers' environment for `make bench-peers`: a separate venv with the pinned torch, fxquant, and the peer QAT
# libraries the overhead benchmark compares with (Brevitas, NNCF, torchao). Never a dependency of fxquant or of its
# tests: the peers pin other versions of shared packages, so they stay out of .venv. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${BENCH_VENV:-.venv-bench}
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
PEERS="brevitas nncf torchao>=0.18"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[bench-peers] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q $TORCH_PIN
"$VENV/bin/pip" install -q -e . tabulate
# The peers may ask for other torch versions: install them without letting pip replace the pinned torch.
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q $PEERS "torch==2.14.1" || {
    echo "[bench-peers] a peer would not install next to torch 2.14.1; the benchmark reports it as missing" >&2
}
"$VENV/bin/python" - <<'PY'
import importlib
for name in ("brevitas", "nncf", "torchao"):
    try:
        module = importlib.import_module(name)
        print(f"[bench-peers] {name} {getattr(module, '__version__', '?')}")
    except Exception as error:  # a peer that fails to import is reported, not fatal
        print(f"[bench-peers] {name}: not importable ({type(error).__name__}: {error})")
PY
