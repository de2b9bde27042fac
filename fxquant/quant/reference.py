"""The fake-quantization formula in plain torch ops: the reference every kernel is checked against, and the kernel
of ``fxquant::fake_quantize`` on devices that have no dedicated one (and on CPU without a C++ compiler).

Rows: ``scale`` holds one step for the whole tensor or one per row along dim 0 (a weight's output channel, a
group, a token); ``zero_point`` is None, one offset, or one per step. Everything is computed in float32 whatever
x's dtype (exact for bf16 and fp16 inputs), and values are rounded to x's dtype at the end: a bf16 quantizer
gives ``bf16(fake_quantize_fp32(x))``.

Forward, with s = max(step, MIN_STEP), z = clamp(round(offset), Qn, Qp), xc = clamp(x, input_low, input_high)
(the fused activation; ±inf: none) and v = xc·(1/s):  y = clamp(round(v), Qn − z, Qp − z)·s.
Backward (Esser et al. 2020, LSQ; Bhalgat et al. 2020, LSQ+), with m = [Qn − z ≤ round(v) ≤ Qp − z] and
level = clamp(round(v), Qn − z, Qp − z):
    ∂y/∂x = m·[input_low < x < input_high]           (straight-through inside both ranges; hardtanh's mask)
    ∂L/∂s = g · Σ grad·(level − m·v)                  (summed per step)
    ∂L/∂z = −g · s · Σ grad·(1 − m)                    (summed per offset)
with g LSQ's gradient factor. Rounding is half to even (torch.round); NaN stays NaN, and a NaN offset makes its
row NaN.

Example usage::

    y = forward(x, torch.tensor([0.1]), None, -8, 7)
    grad_x, grad_scale, _ = backward(torch.ones_like(x), x, torch.tensor([0.1]), None, -8, 7, 0.01)
"""

from __future__ import annotations

import math

import torch

from fxquant.quant.grid import MIN_STEP

NO_CLAMP = (-math.inf, math.inf)


def _per_row(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A step or offset tensor (one value, or one per row) as float32 shaped to broadcast against x's rows."""
    t = t.detach().float()
    if t.numel() == 1:
        return t.reshape([1] * x.dim())
    return t.reshape([-1] + [1] * (x.dim() - 1))


def applied_grid(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, z, low, high): the step clamped to ≥ MIN_STEP, the offset rounded into [qmin, qmax] (zeros without one),
    and the level range shifted by it, as float32 broadcasting against x's rows.

    Example usage::

        s, z, low, high = applied_grid(x, scale, None, -8, 7)
    """
    s = _per_row(scale, x).clamp(min=MIN_STEP)
    z = torch.zeros_like(s) if zero_point is None else _per_row(zero_point, x).round().clamp(qmin, qmax)
    return s, z, qmin - z, qmax - z


def _clamped_input(x: torch.Tensor, input_low: float, input_high: float) -> torch.Tensor:
    xf = x.float()
    return xf if (input_low, input_high) == NO_CLAMP else xf.clamp(input_low, input_high)


def _levels(v: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    # maximum/minimum propagate a NaN bound (a NaN offset), where clamp would not
    return torch.minimum(torch.maximum(v.round(), low), high)


def forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    input_low: float = -math.inf,
    input_high: float = math.inf,
) -> torch.Tensor:
    """The quantized value of ``x`` (see the module docstring), in x's dtype and memory format.

    Example usage::

        forward(torch.randn(4, 8), torch.rand(4) + 0.1, None, -8, 7)   # one step per row
    """
    s, _, low, high = applied_grid(x, scale, zero_point, qmin, qmax)
    v = _clamped_input(x, input_low, input_high) * (1.0 / s)
    return (_levels(v, low, high) * s).to(x.dtype)


def _row_sums(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` summed per step (or over everything for one step), shaped like ``like``."""
    if like.numel() == 1:
        return t.sum().reshape(like.shape)
    return t.reshape(like.numel(), -1).sum(1).reshape(like.shape)


def backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_factor: float,
    input_low: float = -math.inf,
    input_high: float = math.inf,
    output_mask: tuple[bool, bool, bool] | list[bool] = (True, True, True),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_scale, grad_offset) of :func:`forward` for the upstream gradient ``grad``. An output that
    ``output_mask`` does not ask for (or grad_offset without an offset) is an empty tensor.

    Example usage::

        grad_x, grad_scale, grad_offset = backward(grad, x, scale, None, 0, 15, 0.01, 0.0, 6.0)
    """
    s, _, low, high = applied_grid(x, scale, zero_point, qmin, qmax)
    xc = _clamped_input(x, input_low, input_high)
    v = xc * (1.0 / s)
    r = v.round()
    inside = (r >= low) & (r <= high)
    g = grad.float()
    grad_q = torch.where(inside, g, 0.0)
    empty = scale.new_empty(0)
    grad_x = x.new_empty(0)
    if output_mask[0]:
        passed = grad_q
        if (input_low, input_high) != NO_CLAMP:
            passed = torch.where((x > input_low) & (x < input_high), grad_q, 0.0)
        grad_x = passed.to(grad.dtype)
    grad_scale = empty
    if output_mask[1]:
        residual = g * _levels(v, low, high) - grad_q * v
        grad_scale = _row_sums(residual, scale) * grad_factor
    grad_offset = empty
    if output_mask[2] and zero_point is not None:
        outside = _row_sums((g - grad_q) * s, zero_point) if s.numel() > 1 else _row_sums(g - grad_q, zero_point) * s
        grad_offset = (-outside * grad_factor).reshape(zero_point.shape)
    return grad_x, grad_scale, grad_offset


def token_grid(
    x: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(step, offset or None) of each token of ``x`` (each row of its last axis), as flat float32 vectors: the
    token's max|x| over Qp (symmetric), or its [min, max] widened to hold zero mapped onto [Qn, Qp].

    Example usage::

        scale, zero_point = token_grid(torch.randn(2, 16, 64), -128, 127, symmetric=False)   # 32 of each
    """
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    if symmetric:
        return (rows.abs().amax(dim=1) / qmax).clamp(min=MIN_STEP), None
    return affine_grid(rows.amin(dim=1).clamp(max=0), rows.amax(dim=1).clamp(min=0), qmin, qmax)


def affine_grid(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point mapping [lo, hi] (lo ≤ 0 ≤ hi) onto the integers [qmin, qmax].

    Example usage::

        scale, zero_point = affine_grid(torch.tensor([-1.0]), torch.tensor([3.0]), 0, 15)   # 4/15, 4
    """
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=MIN_STEP)
    return scale, (qmin - torch.round(lo / scale)).clamp(qmin, qmax)


def dynamic_forward(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool) -> torch.Tensor:
    """Per-token dynamic quantization: each token quantized on the grid of :func:`token_grid`, in x's dtype.

    Example usage::

        y = dynamic_forward(torch.randn(2, 16, 64), -128, 127, symmetric=False)
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    scale, zero_point = token_grid(x, qmin, qmax, symmetric)
    rows = x.reshape(-1, x.shape[-1])
    return forward(rows, scale, zero_point, qmin, qmax).reshape(x.shape)
