"""Quantizers against independent plain-PyTorch references (LSQ, LSQ+) and torch.ao (observers)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxquant import QuantizerConfig, make_quantizer
from fxquant.quant.quantizers import integer_range


def round_ste(x):
    return x + (x.round() - x).detach()


def grad_scale(x, g):
    return x * g + (x - x * g).detach()


def lsq_reference(x, scale, zero_point, qmin, qmax, g, axis=None):
    """LSQ/LSQ+ written out (Esser et al.): x̂ = (clamp(round(x/s + z)) − z)·s, step gradient scaled by g."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s = grad_scale(scale, g).reshape(shape)
    z = round_ste(grad_scale(zero_point, g)).reshape(shape)
    v = x / s + z
    r = v.detach().round()
    inside = (r >= qmin) & (r <= qmax)
    # Inside the range: straight-through rounding. At the limits: a constant level (no input gradient;
    # the step's gradient is then Q_min − z or Q_max − z).
    level = torch.where(inside, v + (r - v).detach(), r.clamp(qmin, qmax))
    return (level - z) * s


@given(
    bits=st.integers(2, 8),
    per_channel=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_lsq_weight_matches_reference(bits, per_channel, seed):
    torch.manual_seed(seed)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    config = QuantizerConfig(bits=bits, granularity="per_channel" if per_channel else "per_tensor")
    q = make_quantizer(config, "weight", ch_axis=0)
    y = q(w)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()

    qmin, qmax = integer_range(bits, True)
    flat = w.detach().reshape(6, -1) if per_channel else w.detach().reshape(1, -1)
    expected_init = 2 * flat.abs().mean(1) / math.sqrt(qmax)
    torch.testing.assert_close(q.scale.detach(), expected_init)

    s = q.scale.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    n = w.numel() / 6 if per_channel else w.numel()
    ref = lsq_reference(w2, s, torch.zeros_like(s), qmin, qmax, 1 / math.sqrt(n * qmax), 0 if per_channel else None)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(q.scale.grad, s.grad, rtol=1e-4, atol=1e-5)


@given(bits=st.integers(2, 8), seed=st.integers(0, 1000))
def test_lsq_plus_activation_matches_reference(bits, seed):
    torch.manual_seed(seed)
    x = (torch.randn(4, 3, 5, 5) + 0.5).requires_grad_()
    q = make_quantizer(QuantizerConfig(bits=bits, symmetric=False), "activation")
    y = q(x)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    qmin, qmax = integer_range(bits, False)
    assert q.signed is False and q.learn_offset
    s = q.scale.detach().clone().requires_grad_()
    z = q.zero_point.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    g = 1 / math.sqrt(x.numel() / x.shape[0] * qmax)
    ref = lsq_reference(x2, s, z, qmin, qmax, g)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(q.scale.grad, s.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.zero_point.grad, z.grad, rtol=1e-4, atol=1e-5)


@given(
    bits=st.integers(2, 8),
    scheme=st.sampled_from(["lsq", "lsq_plus", "observer"]),
    per_channel=st.booleans(),
    role=st.sampled_from(["weight", "activation"]),
    seed=st.integers(0, 1000),
)
def test_values_lie_on_the_grid(bits, scheme, per_channel, role, seed):
    """Invariant 5: at most 2^b levels (per channel) inside the representable range."""
    torch.manual_seed(seed)
    x = torch.randn(5, 7, 4) * 3
    config = QuantizerConfig(bits=bits, scheme=scheme, granularity="per_channel" if per_channel else "per_tensor")
    q = make_quantizer(config, role, ch_axis=0)
    y = q(x).detach()
    qmin, qmax = q.qrange()
    channels = y.unbind(0) if per_channel else [y]
    scales = q.scale.detach().reshape(-1)
    zps = q.zero_point.detach().reshape(-1).float()
    for i, channel in enumerate(channels):
        s = scales[i if per_channel else 0]
        z = zps[i if per_channel else 0]
        assert channel.unique().numel() <= 2**bits
        levels = channel / s + z
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert levels.min() >= qmin - 1e-3 and levels.max() <= qmax + 1e-3


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_observer_matches_torch_ao(per_channel, bits):
    from torch.ao.quantization import FakeQuantize
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    torch.manual_seed(0)
    qmin, qmax = integer_range(bits, True)
    if per_channel:
        ours = make_quantizer(
            QuantizerConfig(bits=bits, scheme="observer", observer="moving_average", granularity="per_channel"),
            "weight",
            ch_axis=0,
        )
        theirs = FakeQuantize(
            MovingAveragePerChannelMinMaxObserver,
            quant_min=qmin,
            quant_max=qmax,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
        )
    else:
        ours = make_quantizer(
            QuantizerConfig(bits=bits, scheme="observer", observer="moving_average", symmetric=False), "activation"
        )
        uq = integer_range(bits, False)
        theirs = FakeQuantize(MovingAverageMinMaxObserver, quant_min=uq[0], quant_max=uq[1], dtype=torch.quint8)
        ours.set_signed(False)
    for _ in range(5):
        x = torch.randn(6, 10) * 2 + 0.3
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_disabled_and_full_precision_pass_through():
    x = torch.randn(3, 4)
    q = make_quantizer(QuantizerConfig(bits=4), "activation")
    q.enabled = False
    assert q(x) is x
    q = make_quantizer(QuantizerConfig(bits=32), "activation")
    assert q(x) is x


def test_bits_change_at_run_time_keeps_the_clip_range():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    q = make_quantizer(QuantizerConfig(bits=4, granularity="per_channel"), "weight", ch_axis=0)
    q(w)
    clip_before = q.scale.detach() * q.qrange()[1]
    q.bits = 2
    assert q(w).detach()[0].unique().numel() <= 4
    # signed 4 -> 2 bits: Q_max 7 -> 1; the grid's extent (Q_max − Q_min)·s is kept
    torch.testing.assert_close(q.scale.detach() * 3, clip_before / 7 * 15)
    with pytest.raises(ValueError, match=r"2\.\.8"):
        q.bits = 9


def test_state_dict_restores_initialised_per_channel_quantizer():
    torch.manual_seed(0)
    w = torch.randn(5, 3)
    config = QuantizerConfig(bits=3, granularity="per_channel")
    q = make_quantizer(config, "weight", ch_axis=0)
    expected = q(w)
    fresh = make_quantizer(config, "weight", ch_axis=0)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(w), expected)


def _mse_reference(x: torch.Tensor, bits: int, asymmetric: bool, grid: int = 64) -> tuple[float, float]:
    """The least-squares clipping range by a written-out loop: returns (step, zero point) of the best α."""
    if asymmetric:
        qmin, qmax = integer_range(bits, False)
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    else:
        qmin, qmax = integer_range(bits, True)
        hi = float(x.abs().max())
    best = None
    for k in range(1, grid + 1):
        alpha = k / grid
        if asymmetric:
            s = alpha * (hi - lo) / (qmax - qmin)
            z = min(max(qmin - round(alpha * lo / s), qmin), qmax)
        else:
            s, z = alpha * hi / qmax, 0
        xq = ((torch.round(x / s) + z).clamp(qmin, qmax) - z) * s
        error = float(((xq - x) ** 2).double().sum())
        if best is None or error < best[0]:
            best = (error, s, z)
    return best[1], best[2]


@given(bits=st.integers(2, 8), asymmetric=st.booleans(), seed=st.integers(0, 1000))
def test_mse_init_picks_the_least_squares_range(bits, asymmetric, seed):
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 5, 5).exp() - 0.8  # skewed, with outliers, some negatives
    config = QuantizerConfig(bits=bits, symmetric=not asymmetric, init="mse")
    q = make_quantizer(config, "activation")
    q(x)
    step, zero_point = _mse_reference(x, bits, asymmetric)
    assert float(q.scale.detach()) == pytest.approx(step, rel=1e-5)
    assert float(q.zero_point.detach()) == zero_point
    # the grid holds α = 1 (the min/max range), so MSE is never worse than the min/max start
    default = make_quantizer(QuantizerConfig(bits=bits, symmetric=not asymmetric), "activation")
    if asymmetric:
        with torch.no_grad():
            assert float(((q(x) - x) ** 2).sum()) <= float(((default(x) - x) ** 2).sum()) * (1 + 1e-6)


def test_mse_init_is_per_channel_and_validated():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * torch.linspace(0.1, 3, 6)[:, None, None, None]
    q = make_quantizer(QuantizerConfig(bits=3, granularity="per_channel", init="mse"), "weight", ch_axis=0)
    q(w)
    for c in range(6):
        step, _ = _mse_reference(w[c], 3, asymmetric=False)
        assert float(q.scale[c].detach()) == pytest.approx(step, rel=1e-5)
    with pytest.raises(ValueError, match="init must be one of"):
        QuantizerConfig(init="percentile")
