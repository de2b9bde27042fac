"""The fused CPU fake-quant kernel's grid and its ctypes autograd function: one pass forward, one backward.

:func:`fxquant.quant.kernel.fake_quantize` uses it in eager mode for float32 CPU tensors, contiguous or
channels-last (the pass runs over memory in storage order, and dim 0 is outermost in both), per tensor (any offset)
or per row (a step per output channel or weight group, no offset), when the library from
:mod:`fxquant.quant.native_build` is available: :func:`native_grid` gives the numbers of a call, which go to the
op ``fxquant::fake_quantize_eager`` (the same passes with a C++ autograd node, ``native/fake_quant_op.cpp``) or,
where that op could not be built, to :class:`NativeFakeQuantize` here. The values and the input gradient are bit
for bit those of the torch-ops kernels in ``kernel.py``; the step and offset gradients are the same sums,
accumulated in another order (in double across blocks), so they agree to rounding (``tests/test_native_kernel.py``
checks both paths).

Only ``x`` and the step are saved for the backward: the quantized value is recomputed from x in the same pass.
A fused input clamp (``RowGrid.input_low``/``input_high``: the ReLU, ReLU6 or Hardtanh that
``passes.fuse_activations`` folded into the quantizer) is applied in the same passes, so the activation function
costs no pass of its own.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import NamedTuple

import torch

from fxquant.quant.grid import MIN_STEP_F32, exclusive_bounds


class RowGrid(NamedTuple):
    """What one call needs besides the tensors: the integer clamp range after the offset shift, the open bounds of
    the straight-through mask (``grid.exclusive_bounds``), the smallest step applied, the factor LSQ
    scales the step and offset gradients by, and the input clamp applied before quantizing (±inf: none). In the
    order of ``fxquant::fake_quantize_eager``'s numbers, so ``op(x, scale, zero_point, *grid)`` calls it."""

    low: float
    high: float
    below: float
    above: float
    min_step: float
    grad_factor: float
    input_low: float = -math.inf
    input_high: float = math.inf


def native_grid(
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_factor: float,
    input_range: tuple[float, float] | None = None,
) -> RowGrid | None:
    """The grid of one call; None when the offset is not finite (a diverged run: the tensor kernel propagates it).

    Example usage::

        grid = native_grid(None, 0, 15, 0.01, input_range=(0.0, 6.0))  # a fused ReLU6
    """
    z = 0
    if zero_point is not None:
        offset = zero_point.detach().item()  # one number (per-tensor offsets only); no device sync on CPU
        if not math.isfinite(offset):
            return None
        z = min(max(round(offset), qmin), qmax)  # round half to even, as the tensor kernel's round()
    # clamp(round(x/s) + z, Qn, Qp) − z = clamp(round(x/s), Qn − z, Qp − z) for an integer z
    return _row_grid(qmin - z, qmax - z, grad_factor, input_range)


@functools.lru_cache(maxsize=4096)  # every forward asks; a model has a handful of distinct grids
def _row_grid(low: int, high: int, grad_factor: float, input_range: tuple[float, float] | None) -> RowGrid:
    input_low, input_high = (-math.inf, math.inf) if input_range is None else input_range
    return RowGrid(low, high, *exclusive_bounds(low, high), MIN_STEP_F32, grad_factor, input_low, input_high)


def dense_format(t: torch.Tensor) -> torch.memory_format | None:
    """The memory format in which ``t`` is dense (contiguous, or channels-last for a 4-d or 5-d tensor), or None.

    Two dense tensors of one shape and format hold their elements in the same storage order, so a per-tensor pass
    can run over their storage as flat arrays (a compiled CNN keeps activations channels-last).

    Example usage::

        dense_format(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))  # torch.channels_last
    """
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def native_layout_applies(x: torch.Tensor) -> bool:
    """Whether the C kernel can run over ``x`` where it lies in memory: dense in a format whose outermost dimension
    is the first (contiguous, channels-last), so each row along dim 0 — a per-row step's extent — is one block."""
    return dense_format(x) is not None


def _threads() -> int:
    return torch.get_num_threads()


class NativeFakeQuantize(torch.autograd.Function):
    """y = fake_quantize(clamp(x)) over the rows of a float32 x laid out as :func:`native_layout_applies` asks, one
    step per row (``scale``: contiguous float32, one value per row; ``zero_point``: None, or one offset already
    folded into the grid's range); LSQ/LSQ+ gradients. y has x's strides."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, grid: RowGrid, lib: ctypes.CDLL):
        rows = scale.numel()
        out = torch.empty_like(x)  # x is dense: the same strides, so the same storage order
        lib.fxq_forward(
            x.data_ptr(), out.data_ptr(), rows, x.numel() // rows, scale.data_ptr(), grid.min_step,
            grid.low, grid.high, grid.input_low, grid.input_high, _threads(),
        )  # fmt: skip
        # The step is read again in backward (autograd's version check refuses it if changed in place meanwhile).
        ctx.save_for_backward(x, scale)
        ctx.grid, ctx.lib = grid, lib
        ctx.has_offset = zero_point is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        grad_x, grad_scale, grad_offset = native_backward(
            ctx.lib, ctx.grid, grad, x, scale, ctx.needs_input_grad[1], ctx.has_offset and ctx.needs_input_grad[2]
        )
        grad_input = grad_x if ctx.needs_input_grad[0] else None
        return grad_input, grad_scale, grad_offset, None, None


def native_backward(
    lib: ctypes.CDLL,
    grid: RowGrid,
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    want_scale: bool,
    want_offset: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(grad_x, grad_scale, grad_offset) by the C kernel's backward pass over float32 ``x`` laid out as
    :func:`native_layout_applies` asks and a contiguous ``scale`` (one step per row); ``grad`` is brought to x's
    layout and grad_x has x's strides; a gradient not wanted is None and not summed.

    Example usage::

        grad_x, grad_scale, _ = native_backward(lib, native_grid(None, 0, 15, 0.01), grad, x, scale, True, False)
    """
    rows = scale.numel()
    grad = grad.contiguous(memory_format=dense_format(x))
    grad_x = torch.empty_like(x)
    grad_scale = torch.empty_like(scale) if want_scale else None
    grad_offset = torch.empty_like(scale) if want_offset else None
    status = lib.fxq_backward(
        grad.data_ptr(), x.data_ptr(), grad_x.data_ptr(), rows, x.numel() // rows, scale.data_ptr(),
        grid.min_step, grid.low, grid.high, grid.below, grid.above, grid.input_low, grid.input_high,
        grid.grad_factor,
        None if grad_scale is None else grad_scale.data_ptr(),
        None if grad_offset is None else grad_offset.data_ptr(),
        _threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"fxquant's native kernel could not allocate sums for {rows} rows")
    return grad_x, grad_scale, grad_offset
