"""fake_quantize (the op, on this machine's kernel) against torch's fused learnable kernels (values and the LSQ/LSQ+
gradients), the plain formula, and the dtype contract of bf16/fp16 inputs."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant.quant.kernel import fake_quantize
from fxquant.quant.quantizers import integer_range

from .strategies import rounding_ties


def torch_kernel(x, scale, zero_point, qmin, qmax, ch_axis, grad_factor):
    if ch_axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, qmin, qmax, grad_factor)
    return torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, ch_axis, qmin, qmax, grad_factor)


@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    ch_axis=st.sampled_from([None, 0, 1, 3]),
    with_offset=st.booleans(),
    spread=st.floats(0.1, 10.0),
    seed=st.integers(0, 10_000),
)
def test_matches_torch_learnable_kernel(bits, signed, ch_axis, with_offset, spread, seed):
    torch.manual_seed(seed)
    qmin, qmax = integer_range(bits, signed)
    x = torch.randn(4, 5, 3, 6) * spread
    channels = 1 if ch_axis is None else x.shape[ch_axis]
    scale = torch.rand(channels) * spread / 4 + 1e-3
    # Integer zero points: torch's backward uses the *unrounded* zero point for its mask while its forward
    # rounds it; fxquant rounds in both (as MQBench does; checked against a written-out reference in
    # test_quantizers.py), so the two agree exactly only on integer zero points.
    # torch's per-tensor backward also masks wrongly for a negative zero point (its per-channel one agrees
    # with fxquant and with the forward): those cases are compared with the written-out reference only.
    low = 0 if ch_axis is None else qmin
    zero_point = torch.randint(low, qmax + 1, (channels,)).float()
    if not with_offset:
        zero_point = torch.zeros(channels)
    upstream = torch.randn_like(x)

    results = []
    for kernel in (torch_kernel, fake_quantize):
        xs, ss, zs = (t.clone().requires_grad_() for t in (x, scale, zero_point))
        z_arg = zs if with_offset or kernel is torch_kernel else None
        y = kernel(xs, ss, z_arg, qmin, qmax, ch_axis, 0.37)
        (y * upstream).sum().backward()
        results.append((y.detach(), xs.grad, ss.grad, zs.grad if with_offset else None))

    (y_ref, gx_ref, gs_ref, gz_ref), (y, gx, gs, gz) = results
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
    # The kernel sums Σg·level and Σg_x·x/s separately (one pass each): float32 rounding is then relative to
    # the magnitude of the terms, not of their (possibly much smaller) difference.
    shape = [1] * x.dim()
    if ch_axis is not None:
        shape[ch_axis] = -1
    magnitude = float((upstream.abs() * (x.abs() / scale.reshape(shape) + max(-qmin, qmax))).sum()) * 0.37
    torch.testing.assert_close(gs, gs_ref, rtol=1e-4, atol=1e-6 * magnitude)
    if with_offset:
        torch.testing.assert_close(gz, gz_ref, rtol=1e-4, atol=1e-5)


def test_no_gradient_for_a_fixed_step():
    x = torch.randn(3, 4, requires_grad=True)
    scale = torch.tensor([0.1])  # a buffer (observer quantizers): no gradient asked, none computed
    fake_quantize(x, scale, None, -8, 7).sum().backward()
    assert scale.grad is None
    assert x.grad is not None


@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    with_offset=st.booleans(),
    ties=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_values_and_input_gradient_are_the_plain_formula(bits, signed, with_offset, ties, seed):
    """fake_quantize against the formula written out: the input gradient passes where round(x/s) + z lies in
    [Qn, Qp], also when every x/s is an exact tie at and around the clipping edges."""
    torch.manual_seed(seed)
    qmin, qmax = integer_range(bits, signed)
    zero_point = torch.tensor([float(torch.randint(qmin, qmax + 1, ()))]) if with_offset else None
    if ties:
        scale, x = rounding_ties(qmin, qmax, zero_point)
    else:
        scale = torch.rand(1) + 0.05
        x = torch.randn(4, 5, 6) * 3
    upstream = torch.randn_like(x)
    xs = x.clone().requires_grad_()
    y = fake_quantize(xs, scale, zero_point, qmin, qmax, None, 0.3)
    (y * upstream).sum().backward()
    z = 0.0 if zero_point is None else float(zero_point)
    levels = torch.round(x * (1.0 / scale)) + z
    torch.testing.assert_close(y.detach(), (levels.clamp(qmin, qmax) - z) * scale, rtol=0, atol=0)
    torch.testing.assert_close(xs.grad, upstream * ((levels >= qmin) & (levels <= qmax)), rtol=0, atol=0)


LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@given(
    bits=st.integers(2, 8),
    per_channel=st.booleans(),
    with_offset=st.booleans(),
    input_range=st.sampled_from([None, (0.0, 6.0)]),
    seed=st.integers(0, 10_000),
)
def test_a_low_precision_input_is_quantized_in_float32_and_rounded_once(
    dtype, bits, per_channel, with_offset, input_range, seed
):
    """The dtype contract: a bf16/fp16 input gives the float32 result rounded to its dtype, an input gradient in its
    dtype, and float32 step and offset gradients equal to those of the float32 input (the same numbers)."""
    torch.manual_seed(seed)
    qmin, qmax = integer_range(bits, not with_offset)
    x = (torch.randn(6, 5, 4) * 3).to(dtype)
    rows = 6 if per_channel else 1
    scale = (torch.rand(rows) * 0.5 + 0.01).requires_grad_()
    zero_point = torch.tensor([3.0], requires_grad=True) if with_offset else None
    upstream = torch.randn_like(x)
    results = []
    for xs in (x.clone().requires_grad_(), x.float().requires_grad_()):
        for t in (scale, zero_point):
            if t is not None:
                t.grad = None
        y = fake_quantize(xs, scale, zero_point, qmin, qmax, 0 if per_channel else None, 0.1, input_range)
        (y * upstream.to(y.dtype)).sum().backward()
        results.append((y, xs.grad, scale.grad.clone(), None if zero_point is None else zero_point.grad.clone()))
    (y, gx, gs, gz), (y32, gx32, gs32, gz32) = results
    assert y.dtype == gx.dtype == dtype and gs.dtype == torch.float32
    torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(gx, gx32.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(gs, gs32, rtol=1e-5, atol=1e-5)
    if with_offset:
        torch.testing.assert_close(gz, gz32, rtol=1e-5, atol=1e-5)


def test_the_smallest_step_survives_fp16():
    """MIN_STEP (1e-8) is 0 in fp16: the step arithmetic stays float32, so an fp16 input with a collapsed step gives
    finite values, not inf/NaN."""
    x = torch.randn(32, dtype=torch.float16, requires_grad=True)
    step = torch.tensor([0.0], requires_grad=True)
    y = fake_quantize(x, step, None, -8, 7)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(step.grad).all()
    torch.testing.assert_close(y, fake_quantize(x.detach().float(), step, None, -8, 7).half(), rtol=0, atol=0)
