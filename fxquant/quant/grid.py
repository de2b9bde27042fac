"""Numbers every fake-quant kernel shares: the smallest step applied and the straight-through mask's bounds.

Example usage::

    below, above = exclusive_bounds(-8, 7)   # -8.5 (one float32 below, -8 is even), 7.5
"""

from __future__ import annotations

import functools
import math

import torch

MIN_STEP = 1e-8  # the smallest step applied (a learned step can be pushed to or through zero)
MIN_STEP_F32 = float(torch.tensor(MIN_STEP, dtype=torch.float32))  # the same, as the float32 kernels see it


@functools.lru_cache(maxsize=1024)  # called on every forward, with a handful of distinct ranges
def exclusive_bounds(low: int, high: int) -> tuple[float, float]:
    """Open-interval bounds (a, b) on v = x/s such that a < v < b exactly when round(v) ∈ [low, high] under
    round-half-to-even: at a tie v = high + ½ rounds down (inside) when high is even, so b moves one float32
    above the tie; the same below.

    Example usage::

        exclusive_bounds(0, 15)   # (-0.50000006, 15.5)
    """
    below, above = low - 0.5, high + 0.5
    if low % 2 == 0:
        below = float(torch.nextafter(torch.tensor(below), torch.tensor(-math.inf)))
    if high % 2 == 0:
        above = float(torch.nextafter(torch.tensor(above), torch.tensor(math.inf)))
    return below, above
