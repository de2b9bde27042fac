"""The fused GPU kernels of fxquant's fake-quant ops, in Triton: one pass forward, one pass backward with the step's
and offset's gradient sums reduced in the kernel, and a one-pass per-token dynamic quantizer.

Why Triton rather than CUDA C++: it ships with torch's CUDA wheels (nothing to compile at install, no nvcc on the
user's machine), it runs on CPU under ``TRITON_INTERPRET=1`` so CI tests these very kernels, and a memory-bound
elementwise pass with a row reduction is what it does well.

Layout: x is seen as ``rows`` rows of ``inner`` elements in storage order (contiguous, or channels-last, where dim 0
is still outermost; any other layout is copied first). One step per row, or one for all (``scale_stride`` 0).
Arithmetic is float32 whatever x's dtype and equals :mod:`fxquant.quant.reference` bit for bit in the values and
the input gradient: the reciprocal of the step is an IEEE division (``div_rn``; Triton's ``/`` is approximate),
rounding is half to even by the 1.5·2²³ trick (the value is clamped to a small integer range first), and the
straight-through mask tests the unrounded value against the tie-exact bounds of the range. The step and offset
gradients are summed in float32 per tile and across tiles in a fixed order (deterministic), so they agree with the
reference to rounding.

Backward work division: each program takes ``BLOCK_R`` rows and one of ``splits`` stretches of their columns, loops
over it in tiles of ``BLOCK_C`` and writes one partial sum per row; a second small kernel adds the partials (no
atomics, so the same inputs give the same gradients). Nothing here synchronises with the host.

Example usage::

    y = fake_quantize_forward(x, scale, None, -8, 7, 0.0, math.inf)           # x on CUDA
    grad_x, grad_scale, _ = fake_quantize_backward(grad, x, scale, None, -8, 7, 0.01, -math.inf, math.inf,
                                                   [True, True, False])
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.compiler import errors as compile_errors
from triton.runtime import errors as runtime_errors

from fxquant.quant.grid import MIN_STEP_F32, in_layout_of, rows_are_blocks

MAGIC = 12582912.0  # 1.5·2²³: (v + MAGIC) − MAGIC rounds |v| < 2²² half to even
TILE = 2048  # elements per tile: 16 per thread at 4 warps (16-byte loads at fp32, 32 bytes at bf16)
MAX_DYNAMIC_ROW = 32768  # the longest token the one-pass dynamic kernel holds in registers
# What a kernel that cannot be built for this GPU or Triton raises (the caller then falls back to the reference)
KERNEL_ERRORS = tuple(
    error
    for error in (
        getattr(compile_errors, "CompilationError", None),
        getattr(runtime_errors, "OutOfResources", None),
        getattr(runtime_errors, "PTXASError", None),
    )
    if error is not None
)


@triton.jit
def _row_grid(scale_ptr, zp_ptr, r, rmask, scale_stride, zp_stride, qmin, qmax, min_step, HAS_ZP: tl.constexpr):
    """Per row of the tile: the applied step, its IEEE reciprocal, the level range shifted by the offset, and
    whether the offset is NaN."""
    s = tl.load(scale_ptr + r * scale_stride, mask=rmask, other=1.0).to(tl.float32)
    s = tl.where(s < min_step, min_step, s)  # NaN stays NaN
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    if HAS_ZP:
        z = tl.load(zp_ptr + r * zp_stride, mask=rmask, other=0.0).to(tl.float32)
        z = tl.where(z < qmin, qmin, z)
        z = tl.where(z > qmax, qmax, z)
        z = (z + MAGIC) - MAGIC
        low = qmin - z
        high = qmax - z
        nan_row = z != z
    else:
        low = tl.full(s.shape, 0.0, tl.float32) + qmin
        high = tl.full(s.shape, 0.0, tl.float32) + qmax
        nan_row = s != s
    return s, inv, low, high, nan_row


@triton.jit
def _levels(v, low, high, nan_row):
    """round(clamp(v, low, high)) half to even; NaN in a NaN-offset row."""
    v = tl.where(v < low, low, v)
    v = tl.where(v > high, high, v)
    level = (v + MAGIC) - MAGIC
    return tl.where(nan_row, float("nan"), level)


@triton.jit
def _store_values(y_ptr, offsets, y, mask):
    """Store float32 values in the output's dtype, rounded to nearest even. For bf16 the rounding is done on the
    bits first (Triton's interpreter truncates float32 to bf16; on a GPU the conversion that follows is then exact),
    so the interpreter in CI runs the very arithmetic a GPU runs."""
    if y_ptr.dtype.element_ty == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000  # NaN and ±inf keep their bits
        y = bits.to(tl.float32, bitcast=True)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _clamp_input(x, in_low, in_high, CLAMP_INPUT: tl.constexpr):
    if CLAMP_INPUT:
        x = tl.where(x < in_low, in_low, x)
        x = tl.where(x > in_high, in_high, x)
    return x


@triton.jit
def _forward_kernel(
    x_ptr, y_ptr, scale_ptr, zp_ptr, rows, inner, col_blocks, scale_stride, zp_stride,
    qmin, qmax, in_low, in_high, min_step,
    HAS_ZP: tl.constexpr, CLAMP_INPUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    r = (pid // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = (pid % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = r < rows
    s, inv, low, high, nan_row = _row_grid(scale_ptr, zp_ptr, r, rmask, scale_stride, zp_stride, qmin, qmax,
                                           min_step, HAS_ZP)  # fmt: skip
    offsets = r.to(tl.int64)[:, None] * inner + c[None, :]
    mask = rmask[:, None] & (c < inner)[None, :]
    x = _clamp_input(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32), in_low, in_high, CLAMP_INPUT)
    level = _levels(x * inv[:, None], low[:, None], high[:, None], nan_row[:, None])
    _store_values(y_ptr, offsets, level * s[:, None], mask)


@triton.jit
def _inside(v, low, high):
    """round(v) ∈ [low, high] under round-half-to-even, on the unrounded v: a tie at low − ½ rounds to low exactly
    when low is even, a tie at high + ½ to high when high is even."""
    low_even = ((low * 0.5 + MAGIC) - MAGIC) == low * 0.5
    high_even = ((high * 0.5 + MAGIC) - MAGIC) == high * 0.5
    above_low = (v > low - 0.5) | ((v == low - 0.5) & low_even)
    below_high = (v < high + 0.5) | ((v == high + 0.5) & high_even)
    return above_low & below_high


@triton.jit
def _backward_kernel(
    g_ptr, x_ptr, gx_ptr, part_ptr, scale_ptr, zp_ptr, rows, inner, splits, split_len, scale_stride, zp_stride,
    qmin, qmax, in_low, in_high, min_step,
    HAS_ZP: tl.constexpr, CLAMP_INPUT: tl.constexpr, WANT_X: tl.constexpr, WANT_SUMS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = pid % splits
    r = (pid // splits) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    _, inv, low, high, nan_row = _row_grid(scale_ptr, zp_ptr, r, rmask, scale_stride, zp_stride, qmin, qmax,
                                           min_step, HAS_ZP)  # fmt: skip
    inv2, low2, high2, nan2 = inv[:, None], low[:, None], high[:, None], nan_row[:, None]
    acc_residual = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_outside = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    start = split * split_len
    stop = tl.minimum(start + split_len, inner)
    for c0 in range(start, stop, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        offsets = r.to(tl.int64)[:, None] * inner + c[None, :]
        mask = rmask[:, None] & (c < stop)[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        v = _clamp_input(x, in_low, in_high, CLAMP_INPUT) * inv2
        g_q = tl.where(_inside(v, low2, high2), g, 0.0)
        if WANT_X:
            g_x = g_q
            if CLAMP_INPUT:
                g_x = tl.where((x > in_low) & (x < in_high), g_q, 0.0)
            tl.store(gx_ptr + offsets, g_x.to(gx_ptr.dtype.element_ty), mask=mask)
        if WANT_SUMS:
            residual = g * _levels(v, low2, high2, nan2) - g_q * v
            acc_residual += tl.where(mask, residual, 0.0)
            acc_outside += tl.where(mask, g - g_q, 0.0)
    if WANT_SUMS:
        at = (r * splits + split) * 2
        tl.store(part_ptr + at, tl.sum(acc_residual, axis=1), mask=rmask)
        tl.store(part_ptr + at + 1, tl.sum(acc_outside, axis=1), mask=rmask)


@triton.jit
def _finish_kernel(
    part_ptr, gs_ptr, gz_ptr, scale_ptr, rows, splits, scale_stride, grad_factor, min_step,
    WANT_SCALE: tl.constexpr, WANT_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per row: the partial sums added in split order, times LSQ's factor (and −s for the offset)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = r < rows
    residual = tl.zeros([BLOCK], dtype=tl.float32)
    outside = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, splits):
        at = (r * splits + k) * 2
        residual += tl.load(part_ptr + at, mask=rmask, other=0.0)
        outside += tl.load(part_ptr + at + 1, mask=rmask, other=0.0)
    if WANT_SCALE:
        tl.store(gs_ptr + r, residual * grad_factor, mask=rmask)
    if WANT_OFFSET:
        s = tl.load(scale_ptr + r * scale_stride, mask=rmask, other=1.0).to(tl.float32)
        s = tl.where(s < min_step, min_step, s)
        tl.store(gz_ptr + r, -outside * s * grad_factor, mask=rmask)


@triton.jit
def _dynamic_kernel(
    x_ptr, y_ptr, rows, inner, qmin, qmax, min_step,
    SYMMETRIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per token (row): its grid from its own range, then the row quantized on it; one read, one write."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rmask = r < rows
    offsets = r.to(tl.int64)[:, None] * inner + c[None, :]
    mask = rmask[:, None] & (c < inner)[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0  # torch's amin/amax propagate NaN: the row becomes NaN
    if SYMMETRIC:
        bound = tl.max(tl.abs(x), axis=1)
        s = tl.math.div_rn(bound, tl.full(bound.shape, 1.0, tl.float32) * qmax)
        s = tl.where(s < min_step, min_step, s)
        low = tl.full(s.shape, 0.0, tl.float32) + qmin
        high = tl.full(s.shape, 0.0, tl.float32) + qmax
    else:
        lo = tl.minimum(tl.min(x, axis=1), 0.0)  # masked elements load 0: the range already holds zero
        hi = tl.maximum(tl.max(x, axis=1), 0.0)
        s = tl.math.div_rn(hi - lo, tl.full(lo.shape, 1.0, tl.float32) * (qmax - qmin))
        s = tl.where(s < min_step, min_step, s)
        z = qmin - ((tl.math.div_rn(lo, s) + MAGIC) - MAGIC)
        z = tl.where(z < qmin, qmin, z)
        z = tl.where(z > qmax, qmax, z)
        low = qmin - z
        high = qmax - z
    s = tl.where(has_nan, float("nan"), s)
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    level = _levels(x * inv[:, None], low[:, None], high[:, None], has_nan[:, None])
    _store_values(y_ptr, offsets, level * s[:, None], mask)


def _in_storage_order_of(t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``t`` (blocks' shape) laid out like ``blocks``, so that both are read in one storage order."""
    return t if t.stride() == blocks.stride() else torch.empty_like(blocks).copy_(t)


def _tile(inner: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of a TILE-element tile for rows of ``inner`` elements: short rows share a tile."""
    block_c = min(TILE, triton.next_power_of_2(max(inner, 1)))
    return max(1, TILE // block_c), block_c


@functools.cache
def _programs_wanted(device_index: int) -> int:
    """Programs that keep every multiprocessor busy in the backward pass (four per SM); read once per device."""
    return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _wanted(device: torch.device) -> int:
    return _programs_wanted(device.index or 0) if device.type == "cuda" else 64


def _layout(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> tuple[torch.Tensor, int, int, int, int, torch.Tensor, torch.Tensor | None]:
    """(x as row blocks, rows, inner, scale stride, offset stride, contiguous scale, contiguous offset)."""
    blocks = x if rows_are_blocks(x) else x.contiguous()
    offsets = 0 if zero_point is None else zero_point.numel()
    rows = max(scale.numel(), offsets)
    inner = x.numel() // rows if rows else 0
    scale = scale.detach().contiguous()
    zero_point = None if zero_point is None else zero_point.detach().float().contiguous()
    return blocks, rows, inner, int(scale.numel() > 1), int(offsets > 1), scale, zero_point


def fake_quantize_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_factor: float = 1.0,
    input_low: float = -math.inf,
    input_high: float = math.inf,
) -> torch.Tensor:
    """The CUDA kernel of ``fxquant::fake_quantize`` (see :func:`fxquant.quant.reference.forward`).

    Example usage::

        y = fake_quantize_forward(x.cuda(), torch.tensor([0.1], device="cuda"), None, -8, 7)
    """
    if x.numel() == 0:
        return torch.empty_like(x)
    blocks, rows, inner, scale_stride, zp_stride, scale, zero_point = _layout(x, scale, zero_point)
    y = torch.empty_like(blocks)
    block_r, block_c = _tile(inner)
    col_blocks = triton.cdiv(inner, block_c)
    grid = (triton.cdiv(rows, block_r) * col_blocks,)
    _forward_kernel[grid](
        blocks, y, scale, scale if zero_point is None else zero_point, rows, inner, col_blocks, scale_stride,
        zp_stride, float(qmin), float(qmax), float(input_low), float(input_high), MIN_STEP_F32,
        HAS_ZP=zero_point is not None, CLAMP_INPUT=(input_low, input_high) != (-math.inf, math.inf),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return in_layout_of(y, x)


def fake_quantize_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_factor: float,
    input_low: float,
    input_high: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CUDA kernel of ``fxquant::fake_quantize_backward`` (see :func:`fxquant.quant.reference.backward`):
    grad_x in x's dtype, step and offset gradients in float32; an output not asked for is empty.

    Example usage::

        grad_x, grad_scale, _ = fake_quantize_backward(grad, x, scale, None, 0, 15, 0.01, 0.0, 6.0,
                                                       [True, True, False])
    """
    want_x, want_scale = output_mask[0], output_mask[1]
    want_offset = output_mask[2] and zero_point is not None
    grad_x, grad_scale, grad_offset = x.new_empty(0), scale.new_empty(0), scale.new_empty(0)
    want_sums = want_scale or want_offset
    if not (want_x or want_sums):
        return grad_x, grad_scale, grad_offset
    if x.numel() == 0:  # nothing to sum: zero gradients of the asked shapes
        grad_x = torch.zeros_like(x) if want_x else grad_x
        grad_scale = torch.zeros_like(scale) if want_scale else grad_scale
        return grad_x, grad_scale, torch.zeros_like(zero_point) if want_offset else grad_offset
    blocks, rows, inner, scale_stride, zp_stride, steps, offsets = _layout(x, scale, zero_point)
    g = _in_storage_order_of(grad, blocks)
    gx = torch.empty_like(blocks) if want_x else blocks
    block_r, block_c = _tile(inner)
    row_blocks, col_blocks = triton.cdiv(rows, block_r), triton.cdiv(inner, block_c)
    splits = max(1, min(col_blocks, triton.cdiv(_wanted(x.device), row_blocks)))
    split_len = triton.cdiv(col_blocks, splits) * block_c
    splits = triton.cdiv(inner, split_len)
    partials = torch.empty(rows * splits * 2 if want_sums else 1, device=x.device, dtype=torch.float32)
    _backward_kernel[(row_blocks * splits,)](
        g, blocks, gx, partials, steps, steps if offsets is None else offsets, rows, inner, splits, split_len,
        scale_stride, zp_stride, float(qmin), float(qmax), float(input_low), float(input_high), MIN_STEP_F32,
        HAS_ZP=offsets is not None, CLAMP_INPUT=(input_low, input_high) != (-math.inf, math.inf), WANT_X=want_x,
        WANT_SUMS=want_sums, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    if want_x:
        grad_x = in_layout_of(gx, x)
    if want_sums:
        row_scale = torch.empty(rows, device=x.device, dtype=torch.float32)
        row_offset = torch.empty(rows, device=x.device, dtype=torch.float32) if want_offset else row_scale
        finish_block = min(1024, triton.next_power_of_2(rows))
        _finish_kernel[(triton.cdiv(rows, finish_block),)](
            partials, row_scale, row_offset, steps, rows, splits, scale_stride, float(grad_factor), MIN_STEP_F32,
            WANT_SCALE=want_scale, WANT_OFFSET=want_offset, BLOCK=finish_block, num_warps=4,
        )  # fmt: skip
        if want_scale:
            grad_scale = _per_parameter(row_scale, scale)
        if want_offset:
            grad_offset = _per_parameter(row_offset, zero_point)
    return grad_x, grad_scale, grad_offset


def _per_parameter(per_row: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """Row gradients as the parameter's: summed when one value serves every row."""
    total = per_row if parameter.numel() == per_row.numel() else per_row.sum()
    return total.reshape(parameter.shape)


def fake_quantize_dynamic(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool) -> torch.Tensor | None:
    """The CUDA kernel of ``fxquant::fake_quantize_dynamic`` (see :func:`fxquant.quant.reference.dynamic_forward`),
    or None for a token longer than one pass holds (the caller then uses the reference).

    Example usage::

        y = fake_quantize_dynamic(hidden.cuda(), -128, 127, symmetric=False)
    """
    inner = x.shape[-1] if x.dim() else 1
    if x.numel() == 0:
        return torch.empty_like(x)
    if inner > MAX_DYNAMIC_ROW:
        return None
    rows_of_x = x.contiguous()
    y = torch.empty_like(rows_of_x)
    rows = x.numel() // inner
    block_c = triton.next_power_of_2(inner)
    block_r = max(1, TILE // block_c)
    _dynamic_kernel[(triton.cdiv(rows, block_r),)](
        rows_of_x, y, rows, inner, float(qmin), float(qmax), MIN_STEP_F32, SYMMETRIC=symmetric, BLOCK_R=block_r,
        BLOCK_C=block_c, num_warps=min(16, max(4, block_c * block_r // 512)),
    )  # fmt: skip
    return in_layout_of(y, x)
