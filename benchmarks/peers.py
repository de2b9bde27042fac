"""The peers' QAT, prepared the way each documents it, for the overhead benchmark (never used by fxquant).

Each entry of :data:`PEERS` takes a float model and a batch and returns a copy ready for QAT steps, or raises
:class:`Unavailable` saying why (the library is not installed, or cannot take this model). They are installed
only in the benchmark's own environment (``make bench-peers``).

Example usage::

    qat_model = PEERS["Brevitas W4A4"](model, x)
"""

from __future__ import annotations

import copy
import importlib
import os
import warnings
from collections.abc import Callable

import torch
from torch import nn


class Unavailable(Exception):
    """A peer cannot be measured here (not installed, or it rejects the model)."""


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception as error:  # not installed, or broken against this torch
        raise Unavailable(f"{name} not importable ({type(error).__name__}: {str(error)[:80]})") from None


def versions() -> dict[str, str]:
    """The installed peers' versions."""
    found = {}
    for name in ("brevitas", "nncf", "torchao"):
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # a peer that does not import is simply absent
            continue
    return found


def brevitas_w4a4(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Brevitas' layerwise quantization (every Conv/Linear becomes a Quant layer with a quantized input), its
    default per-tensor float-scale quantizers at 4 bits for weights and inputs."""
    _import("brevitas")
    quantize = _import("brevitas.graph.quantize")
    layer_map = {}
    for float_type, entry in quantize.LAYERWISE_COMPUTE_LAYER_MAP.items():
        if entry is None:  # layers Brevitas leaves alone
            continue
        quant_type, kwargs = entry
        kwargs = dict(kwargs)
        for key in list(kwargs):  # weight_quant -> weight_bit_width = 4, in_proj_input_quant -> ..., and so on
            if key.endswith(("weight_quant", "input_quant")):
                kwargs[key.removesuffix("_quant") + "_bit_width"] = 4
        layer_map[float_type] = (quant_type, kwargs)
    try:
        qmodel = quantize.layerwise_quantize(copy.deepcopy(model), compute_layer_map=layer_map)
    except Exception as error:
        raise Unavailable(f"layerwise_quantize failed ({type(error).__name__}: {str(error)[:80]})") from None
    qmodel.train()
    with torch.no_grad():
        qmodel(x)  # statistics-initialised scales take their first values
    return qmodel


def nncf_int8(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """NNCF's ``nncf.quantize`` (8-bit, its default preset) on one calibration batch; the result is trained as
    its QAT guide does."""
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # it builds a C++ extension once; slow on 2 cores
    nncf = _import("nncf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            qmodel = nncf.quantize(copy.deepcopy(model).eval(), nncf.Dataset([x]), subset_size=1)
        except Exception as error:
            raise Unavailable(f"nncf.quantize failed ({type(error).__name__}: {str(error)[:80]})") from None
    return qmodel.train()


def torchao_8da4w_per_channel(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """torchao's QAT: int8 per-token dynamic activations, int4 per-channel weights (its "8da4w" with per-channel
    weights, as fxquant's lsq_w4a4 has)."""
    qat = _import("torchao.quantization.qat")
    quantization = _import("torchao.quantization")
    qmodel = copy.deepcopy(model)
    config = qat.QATConfig(
        activation_config=qat.IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=qat.IntxFakeQuantizeConfig(torch.int4, "per_channel", is_symmetric=True),
        step="prepare",
    )
    quantization.quantize_(qmodel, config)
    return qmodel.train()


PEERS: dict[str, Callable[[nn.Module, torch.Tensor], nn.Module]] = {
    "Brevitas W4A4": brevitas_w4a4,
    "NNCF 8-bit": nncf_int8,
    "torchao QAT int8-act int4-weight": torchao_8da4w_per_channel,
}
