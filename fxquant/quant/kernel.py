"""The fake-quantization call every fxquant quantizer makes: :func:`fake_quantize` (learned or observed steps) and
:func:`fake_quantize_per_token` (dynamic per-token steps), with LSQ's gradients.

Both call fxquant's ops (:mod:`fxquant.quant.ops`), which have one kernel per device: the fused C passes on CPU,
the fused Triton kernel on CUDA, the torch-ops formula of :mod:`fxquant.quant.reference` elsewhere. The formula,
its gradients and the dtype contract (float32 arithmetic, result in x's dtype) are documented there.

Under ``torch.compile`` (``FXQUANT_COMPILED_QUANTIZER``, read when a graph is traced):

* ``traced_forward`` (the default): the forward is traced as the reference's tensor ops, so that inductor fuses it
  into its neighbours (the batch norm before, the conv after), and the backward is the op
  ``fxquant::fake_quantize_backward`` (one fused pass, the step's sums reduced inside) as an opaque call;
* ``op``: forward and backward stay the opaque ops;
* ``traced``: both are traced tensor ops, and inductor generates the backward too.

``benchmarks/compiled_backward.py`` (CPU) and ``benchmarks/gpu_overhead.py`` (GPU) time the three side by side.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from fxquant.quant import reference
from fxquant.quant.grid import MIN_STEP
from fxquant.quant.ops import gradients_wanted, ops_ready

__all__ = ["MIN_STEP", "clamp_input", "fake_quantize", "fake_quantize_per_token"]


COMPILED_MODES = ("traced_forward", "op", "traced")


class _TracedForward(torch.autograd.Function):
    """What ``torch.compile`` traces: the forward as tensor ops (fused by inductor with its neighbours), the
    backward as the op (one pass) or, with ``traced_backward``, as the reference's tensor ops. Saves what the op's
    own autograd node saves: x, the step and the offset."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, traced_backward, qmin, qmax, grad_factor, input_low, input_high):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.numbers = (qmin, qmax, grad_factor, input_low, input_high)
        ctx.traced_backward = traced_backward
        return reference.forward(x, scale, zero_point, qmin, qmax, input_low, input_high)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        mask = gradients_wanted(ctx, zero_point)
        backward = reference.backward if ctx.traced_backward else torch.ops.fxquant.fake_quantize_backward
        grads = backward(grad, x, scale, zero_point, *ctx.numbers, mask)
        return (*(g if wanted else None for g, wanted in zip(grads, mask)), None, None, None, None, None, None)


@torch.compiler.assume_constant_result  # read once while tracing
def _compiled_mode() -> str:
    mode = os.environ.get("FXQUANT_COMPILED_QUANTIZER", COMPILED_MODES[0])
    if mode not in COMPILED_MODES:
        raise ValueError(f"FXQUANT_COMPILED_QUANTIZER must be one of {', '.join(COMPILED_MODES)}; got {mode!r}")
    return mode


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
    """Quantize-dequantize ``x`` onto ``[qmin, qmax]`` with step ``scale`` (one, or one per channel along
    ``ch_axis``) and ``zero_point`` (None: symmetric, no offset). Differentiable in ``x`` (straight-through),
    ``scale`` and ``zero_point`` (LSQ/LSQ+ gradients, times ``grad_factor``). ``input_range = (low, high)``
    quantizes ``F.hardtanh(x, low, high)`` instead (a fused ReLU or ReLU6; ``high`` may be ``inf``): the same
    values and gradients, and no pass of its own. ``x`` may be float32, bfloat16 or float16: the arithmetic is
    float32 and the result has x's dtype and layout; steps and offsets are float32 and so are their gradients.

    Example usage::

        w_hat = fake_quantize(w, scale, None, -8, 7, ch_axis=0, grad_factor=0.01)
        a_hat = fake_quantize(a, a_step, None, 0, 15, grad_factor=0.002, input_range=(0.0, 6.0))  # ReLU6 first
    """
    input_low, input_high = input_range or (-math.inf, math.inf)
    moved = ch_axis not in (None, 0) and x.dim() > 1
    if moved:  # the op takes steps along dim 0
        x = x.movedim(ch_axis, 0)
    scale = scale if scale.dtype == torch.float32 else scale.float()
    if zero_point is not None and zero_point.dtype != torch.float32:
        zero_point = zero_point.float()
    ops_ready()
    mode = _compiled_mode() if torch.compiler.is_compiling() else "op"
    if mode != "op":
        traced_backward = mode == "traced"
        y = _TracedForward.apply(x, scale, zero_point, traced_backward, qmin, qmax, grad_factor, input_low, input_high)
    else:
        y = torch.ops.fxquant.fake_quantize(x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high)
    return y.movedim(0, ch_axis) if moved else y


def fake_quantize_per_token(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool) -> torch.Tensor:
    """Dynamic per-token fake quantization: each token (row of the last axis) on the grid of its own range —
    max|x| over Qp when ``symmetric``, else its [min, max] (widened to hold zero) over [Qn, Qp] with an offset.
    The gradient passes straight through (every value lies inside its token's range), so nothing is saved for
    backward. One fused pass on CUDA.

    Example usage::

        h_hat = fake_quantize_per_token(hidden, -128, 127, symmetric=False)
    """
    ops_ready()
    return torch.ops.fxquant.fake_quantize_dynamic(x, qmin, qmax, symmetric)


def clamp_input(x: torch.Tensor, input_range: tuple[float, float] | None) -> torch.Tensor:
    """``F.hardtanh(x, *input_range)``, or ``x`` without a range: a fused activation applied on its own. Hardtanh
    (not clamp) because its gradient is ReLU's and ReLU6's, zero at the bounds.

    Example usage::

        y = clamp_input(x, (0.0, 6.0))  # ReLU6
    """
    if input_range is None:
        return x
    return F.hardtanh(x, *input_range)
