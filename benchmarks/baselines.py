"""Peers' QAT as baselines for the benchmarks (never used by fxquant itself): torch.ao's FX QAT.

Example usage::

    baseline = ao_prepare_qat_fx(model, (torch.randn(1, 3, 64, 64),), "learnable4")
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qat_qconfig_mapping, observer
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
from torch.ao.quantization.quantize_fx import prepare_qat_fx

AO_BASELINES = ("x86", "learnable4")


def ao_prepare_qat_fx(model: nn.Module, example_inputs: tuple, preset: str = "x86") -> nn.Module:
    """torch.ao's FX QAT on a copy of ``model``, as a benchmark baseline (not used by fxquant itself).

    ``x86``: torch.ao's default QAT qconfig (observer fake-quant, 8 bits). ``learnable4``: its learnable
    fake-quant (LSQ-style, grad scaling on) at 4 bits, per-channel symmetric weights and per-tensor affine
    activations — the closest torch.ao has to fxquant's ``lsq_w4a4``. Call :func:`ao_start_learning` after the
    first batch so that its steps are learned instead of re-estimated by observers every step.

    Example usage::

        baseline = ao_prepare_qat_fx(model, (torch.randn(1, 3, 64, 64),), "learnable4")
    """
    model = copy.deepcopy(model).train()
    if preset == "x86":
        mapping = get_default_qat_qconfig_mapping("x86")
    elif preset == "learnable4":
        activation = _LearnableFakeQuantize.with_args(
            observer=observer.MovingAverageMinMaxObserver,
            quant_min=0,
            quant_max=15,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
            use_grad_scaling=True,
        )
        mapping = QConfigMapping()
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                channels = module.out_channels if hasattr(module, "out_channels") else module.out_features
                weight = _LearnableFakeQuantize.with_args(
                    observer=observer.MovingAveragePerChannelMinMaxObserver,
                    quant_min=-8,
                    quant_max=7,
                    dtype=torch.qint8,
                    qscheme=torch.per_channel_symmetric,
                    ch_axis=0,
                    channel_len=channels,
                    use_grad_scaling=True,
                )
                mapping.set_module_name(name, QConfig(activation=activation, weight=weight))
    else:
        raise ValueError(f"unknown torch.ao preset {preset!r}; use one of {AO_BASELINES}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(model, mapping, example_inputs)


def ao_start_learning(model: nn.Module) -> int:
    """Switch torch.ao learnable fake-quant modules from observing to learning; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, _LearnableFakeQuantize):
            module.enable_param_learning()
            count += 1
    return count
