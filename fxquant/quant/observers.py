"""The one place fxquant touches ``torch.ao.quantization`` (deprecated upstream).

fxquant uses it for observers only (``benchmarks/baselines.py`` uses it as a comparison). When it is gone, min/max and
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


class _MinMaxFallback(nn.Module):
    """Running min/max (or its moving average) per tensor or per channel, like torch.ao's observers."""

    def __init__(self, averaging_constant: float | None, ch_axis: int | None):
        super().__init__()
        self.averaging_constant = averaging_constant
        self.ch_axis = ch_axis
        self.register_buffer("min_val", torch.tensor(float("inf")))  # device: module state, moved by .to()
        self.register_buffer("max_val", torch.tensor(float("-inf")))  # device: module state, moved by .to()

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
