"""The one place fxquant touches ``torch.ao.quantization`` (deprecated upstream).

fxquant uses it for observers only (and benchmarks use it as a baseline). When it is gone, min/max and
moving-average observers fall back to the small implementations below, so fxquant keeps working; only the
histogram observer then raises a clear error.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # pragma: no cover - depends on the installed torch
    from torch.ao.quantization import observer as _ao_observer
except ImportError:  # pragma: no cover
    _ao_observer = None


def ao_available() -> bool:
    """True when ``torch.ao.quantization`` can be imported."""
    return _ao_observer is not None


class _MinMaxFallback(nn.Module):
    """Running min/max (or its moving average) per tensor or per channel, like torch.ao's observers."""

    def __init__(self, averaging_constant: float | None, ch_axis: int | None):
        super().__init__()
        self.averaging_constant = averaging_constant
        self.ch_axis = ch_axis
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ch_axis is None:
            lo, hi = torch.aminmax(x)
        else:
            flat = x.transpose(0, self.ch_axis).flatten(1)
            lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        if self.min_val.numel() != lo.numel() or torch.isinf(self.min_val).all():
            self.min_val, self.max_val = lo.clone(), hi.clone()
        elif self.averaging_constant is None:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        else:
            c = self.averaging_constant
            self.min_val, self.max_val = self.min_val + c * (lo - self.min_val), self.max_val + c * (hi - self.max_val)
        return x


def make_observer(kind: str, ch_axis: int | None) -> nn.Module:
    """An observer module with ``min_val``/``max_val`` after it has seen data.

    ``kind`` is ``minmax``, ``moving_average`` or ``histogram``; ``ch_axis`` None means per tensor.
    The quantization range is applied by the caller, so the observer only has to track statistics.
    """
    if _ao_observer is not None:
        if ch_axis is None:
            cls = {
                "minmax": _ao_observer.MinMaxObserver,
                "moving_average": _ao_observer.MovingAverageMinMaxObserver,
                "histogram": _ao_observer.HistogramObserver,
            }[kind]
            return cls()
        if kind == "histogram":
            raise ValueError("the histogram observer is per tensor only; use minmax or moving_average per channel")
        cls = {
            "minmax": _ao_observer.PerChannelMinMaxObserver,
            "moving_average": _ao_observer.MovingAveragePerChannelMinMaxObserver,
        }[kind]
        return cls(ch_axis=ch_axis)
    if kind == "histogram":  # pragma: no cover
        raise RuntimeError("the histogram observer needs torch.ao.quantization, which this torch lacks")
    return _MinMaxFallback(0.01 if kind == "moving_average" else None, ch_axis)  # pragma: no cover


def observed_range(observer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) an observer has seen; the histogram observer's are its clipping range after search."""
    if _ao_observer is not None and isinstance(observer, _ao_observer.HistogramObserver):
        return observer._non_linear_param_search()
    return observer.min_val, observer.max_val


def reduce_observed_range(observer: nn.Module, reduce) -> None:
    """Combine an observer's min/max across data-parallel ranks (``reduce(tensor, op)``) in place."""
    if _ao_observer is not None and isinstance(observer, _ao_observer.HistogramObserver):
        raise ValueError("the histogram observer cannot be synchronised across ranks; use minmax or moving_average")
    reduce(observer.min_val, "min")
    reduce(observer.max_val, "max")


# -- baselines for the benchmarks ----------------------------------------------------------------------------
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
    import copy
    import warnings

    from torch.ao.quantization import QConfig, QConfigMapping, get_default_qat_qconfig_mapping
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    model = copy.deepcopy(model).train()
    if preset == "x86":
        mapping = get_default_qat_qconfig_mapping("x86")
    elif preset == "learnable4":
        activation = _LearnableFakeQuantize.with_args(
            observer=_ao_observer.MovingAverageMinMaxObserver,
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
                    observer=_ao_observer.MovingAveragePerChannelMinMaxObserver,
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
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    count = 0
    for module in model.modules():
        if isinstance(module, _LearnableFakeQuantize):
            module.enable_param_learning()
            count += 1
    return count
