#!/usr/bin/env bash
# One-time set-up of a fresh clone: a venv with the pinned torch, fxquant itself (editable, with the test, export
# and docs extras) and the real Fashion-MNIST data. Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")))' 2>/dev/null; then
    echo "[setup] installing $TORCH_PIN (about a minute from the local wheel cache)"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q $TORCH_PIN
fi
if ! "$VENV/bin/python" -c 'import fxquant, pytest, hypothesis, onnx, onnxscript, onnxruntime, transformers, torchao, mkdocs, material, mkdocstrings' 2>/dev/null; then
    echo "[setup] installing fxquant (editable) with its test, export and docs extras"
    "$VENV/bin/pip" install -q -e '.[test,export,docs]'
fi

# Real data: Debian's package installs the IDX files under /usr/share/datasets/fashion-mnist.
if [ -z "${FXQUANT_DATA:-}" ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[setup] installing dataset-fashion-mnist with apt-get"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
    else
        echo "[setup] Fashion-MNIST is missing. Run: sudo apt-get install -y dataset-fashion-mnist" >&2
        echo "[setup] or point FXQUANT_DATA at a torchvision FashionMNIST folder." >&2
    fi
fi

# A C and a C++ compiler for the fused CPU fake-quant kernel (fxquant/quant/native/fake_quant.c) and its eager op
# (native/fake_quant_op.cpp, compiled against torch's headers), both built on first use. Without them fxquant still
# works: without C++ it calls the C kernel through ctypes (more time per call), without C on its slower torch-ops
# kernel. In CI both are what is tested, so install them.
if ! command -v "${CC:-cc}" >/dev/null || ! command -v "${CXX:-c++}" >/dev/null; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[setup] installing C and C++ compilers (gcc, g++) with apt-get, for the native fake-quant kernel"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc g++
    else
        echo "[setup] no C or C++ compiler: fxquant will use a slower kernel. Install gcc and g++ for the fast one." >&2
    fi
fi
