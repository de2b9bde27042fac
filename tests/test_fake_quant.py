"""The fake-quant kernel against torch's fused learnable kernels (values and the LSQ/LSQ+ gradients)."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant.quant import kernel as kernels
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
def test_eager_cpu_per_tensor_path_equals_the_general_kernel(bits, signed, with_offset, ties, seed):
    """The Python-number path (eager CPU, one step) against the tensor path torch.compile traces: identical
    values and input gradients, also when every x/s is an exact tie at and around the clipping edges."""
    torch.manual_seed(seed)
    qmin, qmax = integer_range(bits, signed)
    zero_point = torch.tensor([float(torch.randint(qmin, qmax + 1, ()))]) if with_offset else None
    if ties:
        scale, x = rounding_ties(qmin, qmax, zero_point)
    else:
        scale = torch.rand(1) + 0.05
        x = torch.randn(4, 5, 6) * 3
    upstream = torch.randn_like(x)
    results = []
    for apply in (
        lambda *a: kernels._FakeQuantize.apply(*a[:5], None, a[5]),
        lambda x, s, z, *rest: kernels._FakeQuantizePerTensorCPU.apply(
            x, s, z, float(s), 0.0 if z is None else float(z), *rest
        ),
    ):
        xs, ss = x.clone().requires_grad_(), scale.clone().requires_grad_()
        zs = zero_point.clone().requires_grad_() if with_offset else None
        y = apply(xs, ss, zs, qmin, qmax, 0.3)
        (y * upstream).sum().backward()
        results.append((y.detach(), xs.grad, ss.grad, zs.grad if with_offset else None))
    (y_ref, gx_ref, gs_ref, gz_ref), (y, gx, gs, gz) = results
    # and both against the plain formula: the input gradient passes where round(x/s) + z lies in [Qn, Qp]
    z = 0.0 if zero_point is None else float(zero_point)
    levels = torch.round(x * (1.0 / scale)) + z
    torch.testing.assert_close(y_ref, (levels.clamp(qmin, qmax) - z) * scale, rtol=0, atol=0)
    torch.testing.assert_close(gx_ref, upstream * ((levels >= qmin) & (levels <= qmax)), rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-5, atol=1e-6)
    if with_offset:
        torch.testing.assert_close(gz, gz_ref, rtol=1e-5, atol=1e-6)
