"""The fake-quantization kernel every fxquant quantizer calls, with LSQ's gradients.

Why not torch's fused ``torch._fake_quantize_learnable_per_*_affine``: on CPU it is a scalar loop, about 9 ms
forward and 10 ms backward for a 128×16×28×28 activation on 2 cores, where a few vectorised elementwise ops
take under 2 ms each way (measured in ``benchmarks/overhead.py``; the kernel check is in
``tests/test_fake_quant.py``, which compares values and gradients with torch's kernel). Boolean masks are
avoided too: comparisons that produce ``bool`` tensors are not vectorised on CPU, so the clipping mask is
applied with ``hardtanh_backward`` (a float kernel that zeroes a gradient outside an open interval).

Forward, with r = round(x/s) + z and c = clamp(r, Qn, Qp):  y = (c − z)·s.
Backward (Esser et al. 2020, LSQ; Bhalgat et al. 2020, LSQ+), with m = [Qn ≤ r ≤ Qp]:
    ∂y/∂x = m (straight-through inside the range),
    ∂y/∂s = (c − z) − m·x/s, scaled by ``grad_factor`` and summed per step,
    ∂y/∂z = −(1 − m)·s,      scaled by ``grad_factor`` and summed per zero point.
The zero point is rounded and clamped into the range in the forward pass, as torch's kernels do.

Three implementations with identical values and input gradients (``tests/test_fake_quant.py`` and
``tests/test_native_kernel.py`` check them against each other, exact ties included): :class:`_FakeQuantize`,
with the step and offset as tensors (per channel, any device, and what ``torch.compile`` traces and fuses into
its neighbours); in eager mode on CPU, for float32 tensors (contiguous or channels-last) per tensor or per output
channel, the fused C kernel (one pass forward, one backward; compiled on first use, see
:mod:`fxquant.quant.native_build`), called as the op ``fxquant::fake_quantize_eager`` with its autograd node in C++
(``native/fake_quant_op.cpp``), or, where that op cannot be built, through ctypes under the Python autograd node of
:mod:`fxquant.quant.native_kernel`; and, where the C kernel is unavailable, for one float32 step on CPU,
:class:`_FakeQuantizePerTensorCPU`, which reads the step as a Python number and makes fewer passes than the
general kernel. Compiled on CPU where the C kernel applies, :class:`_FakeQuantizeCompiledCPU` keeps the forward
as traced tensor ops and runs the C kernel's backward as the opaque op ``fxquant::fake_quantize_backward``, in
whatever layout inductor chose for the activations (no copy to the traced strides).
``fake_quantize`` picks one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxquant.quant.grid import MIN_STEP, MIN_STEP_F32
from fxquant.quant.grid import exclusive_bounds as _exclusive_bounds
from fxquant.quant.native_build import native_eager_op, native_library
from fxquant.quant.native_kernel import (
    NativeFakeQuantize,
    native_backward,
    native_grid,
    native_layout_applies,
)

_hardtanh_backward = torch.ops.aten.hardtanh_backward


def _broadcast_shape(x: torch.Tensor, ch_axis: int | None) -> list[int]:
    shape = [1] * x.dim()
    if ch_axis is not None:
        shape[ch_axis] = -1
    return shape


class _FakeQuantize(torch.autograd.Function):
    """The general kernel: steps and offsets as tensors (per tensor or per channel, any device, and what
    torch.compile traces and fuses)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, ch_axis, grad_factor):
        s, z = _applied_grid(x, scale, zero_point, qmin, qmax, ch_axis)
        inv_s = 1.0 / s
        out = _quantized(x, s, inv_s, z, qmin, qmax)
        # Only tensors that stay alive anyway are saved: x (its producer or the caller keeps it) and out (the
        # conv/linear/matmul that consumes it saves it for its own backward), so quantizers add no activation
        # memory; the mask is recomputed in backward (two elementwise passes).
        ctx.save_for_backward(x, out, s, inv_s, z)
        ctx.qrange, ctx.ch_axis, ctx.grad_factor = (qmin, qmax), ch_axis, grad_factor
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out, s, inv_s, z = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        if z is None and not torch.compiler.is_compiling():
            # No offset, eager: test the clipping range on the forward's unrounded x/s (the same product, bit for
            # bit) with bounds exact at round-half-to-even ties; one pass fewer than rounding it again. (Compiled,
            # the rounding fuses into the same loop, and the bounds' float32 arithmetic would not trace.)
            scaled = torch.mul(x, inv_s)
            grad_x = _hardtanh_backward_into(grad, scaled, *_exclusive_bounds(qmin, qmax), scaled)
        else:
            r = _rounded(x, inv_s, z)
            # r is integer-valued, so the open interval (Qn − ½, Qp + ½) is the closed range [Qn, Qp].
            grad_x = _hardtanh_backward_into(grad, r, qmin - 0.5, qmax + 0.5, r)
        grad_scale = grad_zero_point = None
        per_step = _PerStepSum(x.dim(), ctx.ch_axis)
        if ctx.needs_input_grad[1]:
            # Σ grad·((c − z) − m·x/s) = Σ (grad·out − grad_x·x) / s, with out = (c − z)·s and grad_x = m·grad
            grad_scale = per_step.dot_difference(grad, out, grad_x, x) * (inv_s.reshape(-1) * ctx.grad_factor)
        if z is not None and ctx.needs_input_grad[2]:
            outside = per_step.sum(grad) - per_step.sum(grad_x)
            grad_zero_point = -outside * s.reshape(-1) * ctx.grad_factor
        return grad_x, grad_scale, grad_zero_point, None, None, None, None


def _applied_grid(x, scale, zero_point, qmin, qmax, ch_axis):
    """The step clamped to ≥ MIN_STEP and the offset rounded into the range, shaped to broadcast against x."""
    shape = _broadcast_shape(x, ch_axis)
    s = scale.detach().clamp(min=MIN_STEP).reshape(shape).to(x.dtype)
    z = None
    if zero_point is not None:
        z = zero_point.detach().round().clamp(qmin, qmax).reshape(shape).to(x.dtype)
    return s, z


def _quantized(x, s, inv_s, z, qmin, qmax):
    """(clamp(round(x/s) + z, Qn, Qp) − z)·s, in one new tensor."""
    out = _rounded(x, inv_s, z).clamp_(qmin, qmax)
    if z is not None:
        out.sub_(z)
    return out.mul_(s)


class _FakeQuantizeCompiledCPU(torch.autograd.Function):
    """What ``torch.compile`` traces on CPU where the C kernel applies: the forward as tensor ops (inductor fuses
    them with the batch norm before and the conv after), the backward as the C kernel's single pass, an opaque op.
    Inductor's own backward reads x, the output and the gradient in a reduction loop, then x and the gradient
    again, and is slower (``benchmarks/compiled_backward.py``: mobilenet_v2 1.77 against 1.31 of compiled FP). A
    fused activation's clamp is applied inside, so the saved tensor is its input, as the eager kernel's."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, ch_axis, grad_factor, input_range):
        s, z = _applied_grid(x, scale, zero_point, qmin, qmax, ch_axis)
        out = _quantized(clamp_input(x, input_range), s, 1.0 / s, z, qmin, qmax)
        ctx.save_for_backward(x, s, z)
        ctx.numbers = (qmin, qmax, grad_factor, *(input_range or (-math.inf, math.inf)))
        return out

    @staticmethod
    def backward(ctx, grad):
        x, s, z = ctx.saved_tensors
        offset = None if z is None else z.reshape(-1)
        grad_x, grad_scale, grad_offset = torch.ops.fxquant.fake_quantize_backward(
            grad, x, s.reshape(-1), offset, *ctx.numbers
        )
        return (
            grad_x if ctx.needs_input_grad[0] else None,
            grad_scale if ctx.needs_input_grad[1] else None,
            grad_offset if z is not None and ctx.needs_input_grad[2] else None,
            None, None, None, None, None,
        )  # fmt: skip


class _FakeQuantizePerTensorCPU(torch.autograd.Function):
    """The same values and input gradient as :class:`_FakeQuantize` for one float32 step on CPU in eager mode,
    with the step and offset as Python numbers (reading them is no device sync on CPU). It saves per call the
    small tensor ops on the step and the passes that add and remove the offset: clamp(round(x/s) + z) − z is
    clamp(round(x/s), Qn − z, Qp − z) for an integer z, four passes over x instead of six; and the backward
    tests the clipping range on the unrounded x/s, one pass fewer, with bounds that reproduce round-half-even
    exactly at the ties. (1/s is computed in double and rounded to float32 by the multiply: the same float as a
    float32 division, since double rounding of a quotient is innocuous at these precisions.)"""

    @staticmethod
    def forward(ctx, x, scale, zero_point, scale_value, offset_value, qmin, qmax, grad_factor):
        # scale/zero_point are the tensors gradients flow to; their values arrive as finite Python numbers
        s = max(scale_value, MIN_STEP_F32)
        inv = 1.0 / s
        z = 0 if zero_point is None else min(max(round(offset_value), qmin), qmax)  # round half to even
        low, high = qmin - z, qmax - z
        out = torch.mul(x, inv).round_().clamp_(low, high).mul_(s)
        ctx.save_for_backward(x, out)
        ctx.numbers = (s, inv, grad_factor, _exclusive_bounds(low, high))
        ctx.scale_shape = scale.shape
        ctx.has_offset = zero_point is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        s, inv, grad_factor, (below, above) = ctx.numbers
        scaled = torch.mul(x, inv)  # the forward's x/s, bit for bit
        grad_x = _hardtanh_backward_into(grad, scaled, below, above, scaled)
        grad_scale = grad_zero_point = None
        if ctx.needs_input_grad[1]:
            flat_grad = grad.reshape(-1)
            level_sum = torch.dot(flat_grad, out.reshape(-1)) - torch.dot(grad_x.reshape(-1), x.reshape(-1))
            grad_scale = (level_sum * (inv * grad_factor)).reshape(ctx.scale_shape)
        if ctx.has_offset and ctx.needs_input_grad[2]:
            outside = grad.sum() - grad_x.sum()
            grad_zero_point = (outside * (-s * grad_factor)).reshape(ctx.scale_shape)
        return grad_x, grad_scale, grad_zero_point, None, None, None, None, None


def _native_backward_applies(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, ch_axis: int | None) -> bool:
    """Whether a compiled CPU backward can call the C kernel: float32, per tensor (any offset) or per row along axis
    0 without offsets, and the library built (decided once, when the graph is traced)."""
    if not (x.is_cpu and x.dtype == torch.float32 and x.dim() > 0 and _native_applies(s, z, ch_axis)):
        return False
    return _native_library_loaded()


@torch.compiler.assume_constant_result  # read once while tracing; the compiler does not trace into the build
def _native_library_loaded() -> bool:
    return native_library() is not None


# flexible_layout: inductor passes the tensors in the layout it chose (channels-last activations in a compiled CNN)
# instead of copying them to the strides seen while tracing; the op handles any layout and returns grad_x with x's.
@torch.library.custom_op(
    "fxquant::fake_quantize_backward", mutates_args=(), device_types="cpu", tags=(torch.Tag.flexible_layout,)
)
def _native_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_factor: float,
    input_low: float,
    input_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_scale, grad_offset) of ``fake_quantize(x, ..., input_range=(input_low, input_high))`` by the C
    kernel; ``scale`` holds one step per row of x (one for the whole tensor), ``zero_point`` one offset or None
    (grad_offset is then zeros). grad_x has the strides of ``torch.empty_like(x)``, as the fake kernel says."""
    scale = scale.contiguous()
    input_range = None if (input_low, input_high) == (-math.inf, math.inf) else (input_low, input_high)
    grid = native_grid(zero_point, qmin, qmax, grad_factor, input_range)
    lib = native_library()
    if x.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(scale), torch.zeros_like(scale)
    if grid is None or lib is None:  # a diverged offset, or the kernel switched off since tracing: the tensor path
        grad_x, grad_scale, grad_offset = _tensor_backward(
            grad, x, scale, zero_point, qmin, qmax, grad_factor, input_range
        )
        return _in_layout_of(x, grad_x), grad_scale, grad_offset
    dense = x if native_layout_applies(x) else x.contiguous()  # strided: the kernel runs over a contiguous copy
    grad_x, grad_scale, grad_offset = native_backward(lib, grid, grad, dense, scale, True, zero_point is not None)
    if dense is not x:
        grad_x = _in_layout_of(x, grad_x)
    return grad_x, grad_scale, torch.zeros_like(scale) if grad_offset is None else grad_offset


@_native_backward.register_fake
def _(grad, x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


def _in_layout_of(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (x's shape) with the strides of ``torch.empty_like(x)``: what the op's fake kernel promised."""
    out = torch.empty_like(x)
    return t if out.stride() == t.stride() else out.copy_(t)


def _tensor_backward(grad, x, scale, zero_point, qmin, qmax, grad_factor, input_range):
    """The op's gradients from tensor formulas (what it falls back to; an op runs below autograd, so not by
    autograd): the LSQ/LSQ+ gradients of the module docstring, over the clamped input."""
    rows = scale.numel()
    s, z = _applied_grid(x, scale, zero_point, qmin, qmax, 0)  # one step per row along axis 0 (or one in all)
    inv_s = 1.0 / s
    xc = clamp_input(x, input_range)
    r = _rounded(xc, inv_s, z)
    inside = (r >= qmin) & (r <= qmax)
    grad_q = torch.where(inside, grad, 0.0)
    grad_x = grad_q if input_range is None else torch.where((x > input_range[0]) & (x < input_range[1]), grad_q, 0.0)
    levels = r.clamp(qmin, qmax) if z is None else r.clamp(qmin, qmax) - z
    per_row = (grad * levels - grad_q * xc * inv_s).reshape(rows, -1).sum(1)
    grad_scale = (per_row * grad_factor).reshape(scale.shape)
    grad_offset = torch.zeros_like(scale)
    if z is not None:
        outside = (grad - grad_q).reshape(rows, -1).sum(1)
        grad_offset = (-outside * s.reshape(-1) * grad_factor).reshape(scale.shape)
    return grad_x, grad_scale, grad_offset


def _hardtanh_backward_into(
    grad: torch.Tensor, r: torch.Tensor, low: float, high: float, into: torch.Tensor
) -> torch.Tensor:
    """grad where low < r < high, else 0 — written into ``into`` in eager mode (r is dead after this): one
    allocation fewer in a pass bound by memory traffic."""
    if torch.compiler.is_compiling():
        return _hardtanh_backward(grad, r, low, high)
    return torch.ops.aten.hardtanh_backward.grad_input(grad, r, low, high, grad_input=into)


def _rounded(x: torch.Tensor, inv_s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """round(x/s) + z, as x·(1/s) like torch's kernels (bit-identical results), in one new tensor."""
    r = torch.mul(x, inv_s).round_()
    return r if z is None else r.add_(z)


class _PerStepSum:
    """Reductions to one value per step: over everything (per tensor) or all axes but the channel's."""

    def __init__(self, dim: int, ch_axis: int | None):
        self.ch_axis = ch_axis
        self.dims = [d for d in range(dim) if d != ch_axis]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t.sum().reshape(1) if self.ch_axis is None else t.sum(self.dims)

    def dot_difference(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Σ a·b − Σ c·d per step."""
        if self.ch_axis is None:
            return (torch.dot(a.reshape(-1), b.reshape(-1)) - torch.dot(c.reshape(-1), d.reshape(-1))).reshape(1)
        # Per channel: one product tensor, the second product subtracted into it, one reduction. (A batched dot,
        # bmm of C 1×N by N×1, avoids the product tensor but is 4-8× slower on CPU: 7.2 vs 0.9 ms for 512×4608.)
        return (a * b).addcmul_(c, d, value=-1).sum(self.dims)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
    ch_axis: int | None = None,
    grad_factor: float = 1.0,
    input_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` onto ``[qmin, qmax]`` with step ``scale`` (per tensor, or per channel along
    ``ch_axis``) and ``zero_point`` (None: symmetric, no offset). Differentiable in ``x`` (straight-through),
    ``scale`` and ``zero_point`` (LSQ/LSQ+ gradients, times ``grad_factor``). ``input_range = (low, high)``
    quantizes ``F.hardtanh(x, low, high)`` instead (a fused ReLU or ReLU6; ``high`` may be ``inf``): the same
    values and gradients, and on the fused CPU kernel no pass of its own.

    Example usage::

        w_hat = fake_quantize(w, scale, None, -8, 7, ch_axis=0, grad_factor=0.01)
        a_hat = fake_quantize(a, a_step, None, 0, 15, grad_factor=0.002, input_range=(0.0, 6.0))  # ReLU6 first
    """
    if x.is_cpu and x.dtype == torch.float32 and not torch.compiler.is_compiling():
        return _fake_quantize_cpu(x, scale, zero_point, qmin, qmax, ch_axis, grad_factor, input_range)
    if _native_backward_applies(x, scale, zero_point, ch_axis):
        return _FakeQuantizeCompiledCPU.apply(x, scale, zero_point, qmin, qmax, ch_axis, grad_factor, input_range)
    x = clamp_input(x, input_range)
    # Compiled elsewhere (other devices, layouts, dtypes): the tensor kernel, forward and backward traced and fused.
    # (The C kernel as an opaque op in the forward too was measured: it cut the forward fusions that make compiled
    # FP fast, resnet18 1.14 -> 1.23 of compiled FP.)
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, ch_axis, grad_factor)


def _native_applies(scale: torch.Tensor, zero_point: torch.Tensor | None, ch_axis: int | None) -> bool:
    """Per tensor (any offset) or per row along axis 0 without offsets, with a float32 step: what the fused
    kernel computes."""
    if scale.dtype != torch.float32:
        return False
    return ch_axis is None or (ch_axis == 0 and zero_point is None)


def clamp_input(x: torch.Tensor, input_range: tuple[float, float] | None) -> torch.Tensor:
    """``F.hardtanh(x, *input_range)``, or ``x`` without a range: a fused activation applied on its own. Hardtanh
    (not clamp) because its gradient is ReLU's and ReLU6's, zero at the bounds.

    Example usage::

        y = clamp_input(x, (0.0, 6.0))  # ReLU6
    """
    if input_range is None:
        return x
    return F.hardtanh(x, *input_range)


def _fake_quantize_cpu(x, scale, zero_point, qmin, qmax, ch_axis, grad_factor, input_range):
    """Eager float32 on CPU: the fused native kernel where it applies, else the per-tensor number kernel, else
    the general one (those two after the input clamp, as a separate op)."""
    applies = x.numel() > 0 and scale.is_contiguous() and _native_applies(scale, zero_point, ch_axis)
    if applies and native_layout_applies(x) and scale.numel() == (1 if ch_axis is None else x.shape[0]):
        op = native_eager_op()  # the C passes with a C++ autograd node; else through ctypes under a Python one
        lib = None if op is not None else native_library()
        grid = None if op is None and lib is None else native_grid(zero_point, qmin, qmax, grad_factor, input_range)
        if grid is not None:  # None also for a diverged offset, which the tensor kernel propagates
            if op is not None:
                return op(x, scale, zero_point, *grid)
            return NativeFakeQuantize.apply(x, scale, zero_point, grid, lib)
    x = clamp_input(x, input_range)
    if ch_axis is None:
        scale_value = scale.detach().item()
        offset_value = 0.0 if zero_point is None else zero_point.detach().item()
        if math.isfinite(scale_value) and math.isfinite(offset_value):  # a diverged run's NaN takes the tensor path
            return _FakeQuantizePerTensorCPU.apply(
                x, scale, zero_point, scale_value, offset_value, qmin, qmax, grad_factor
            )
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, ch_axis, grad_factor)
