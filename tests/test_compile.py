"""Compile-friendly quantizers: calibration before training, no host reads in forward, zero graph breaks."""

import copy

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import fxquant
from fxquant.quant import LSQQuantizer, ObserverQuantizer, QuantizerConfig, clamp_steps, make_quantizer
from fxquant.quant.kernel import COMPILED_MODES, MIN_STEP, fake_quantize

from .strategies import INPUT_SHAPE, models


def _graph_breaks(model: nn.Module, *args: torch.Tensor) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(*args)
    return explanation.graph_break_count, [str(b.reason) for b in explanation.break_reasons]


def test_resnet20_w4a4_traces_without_graph_breaks():
    qmodel = fxquant.prepare_qat(fxquant.models.resnet20(), "lsq_w4a4", torch.randn(1, 1, 28, 28))
    fxquant.calibrate(qmodel, torch.randn(6, 1, 28, 28))  # another batch size than the traced one
    breaks, reasons = _graph_breaks(qmodel.train(), torch.randn(4, 1, 28, 28))
    assert breaks == 0, reasons


@settings(max_examples=6)
@given(models(max_ops=4))
def test_generated_models_trace_without_graph_breaks(net):
    qmodel = fxquant.prepare_qat(net, "lsq_w4a4", torch.randn(INPUT_SHAPE))
    fxquant.calibrate(qmodel, torch.randn(INPUT_SHAPE))
    breaks, reasons = _graph_breaks(qmodel.train(), torch.randn(INPUT_SHAPE))
    assert breaks == 0, reasons


def test_an_uncalibrated_model_under_compile_still_initialises_like_eager():
    example, x = torch.randn(1, 1, 8, 8), torch.randn(4, 1, 8, 8)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    eager = fxquant.prepare_qat(model, "lsq_w4a4", example)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    torch.compile(compiled_model.train(), backend="eager")(x)  # falls back to eager for the initialisation
    with torch.no_grad():
        eager.train()(x)
    for name, q in eager.quantizers().items():
        assert compiled_model.quantizers()[name].is_initialized, name
        torch.testing.assert_close(compiled_model.quantizers()[name].scale, q.scale, msg=name)


def test_signedness_and_initialisation_survive_a_state_dict_round_trip():
    example = torch.randn(1, 1, 28, 28)
    trained = fxquant.prepare_qat(fxquant.models.resnet20(), "lsq_w4a4", example)
    fxquant.calibrate(trained, torch.randn(8, 1, 28, 28))
    fresh = fxquant.prepare_qat(fxquant.models.resnet20(), "lsq_w4a4", example)
    assert not any(q.is_initialized for q in fresh.quantizers().values())
    fresh.load_state_dict(trained.state_dict())
    for name, q in fresh.quantizers().items():
        ref = trained.quantizers()[name]
        assert q.is_initialized and q.signed == ref.signed is not None, name
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(fresh.eval()(x), trained.eval()(x), rtol=0, atol=0)


def test_mark_initialized_false_makes_the_next_batch_initialise_again():
    q = make_quantizer(QuantizerConfig(bits=4), "activation")
    q(torch.rand(64) * 10)
    first = q.scale.detach().clone()
    q.mark_initialized(False)
    q(torch.rand(64) * 0.1)
    assert q.is_initialized and bool(q.initialized)
    assert float(q.scale.detach()) < float(first)


def test_calibrate_takes_a_loader_and_observes_up_to_max_batches():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    qmodel = fxquant.prepare_qat(model, "ptq_w8a8", torch.randn(1, 1, 8, 8))
    batches = [(torch.randn(4, 1, 8, 8) * (i + 1), torch.zeros(4, dtype=torch.long)) for i in range(5)]
    bn_free = {k: v.clone() for k, v in qmodel.state_dict().items() if "quant" not in k}
    assert fxquant.calibrate(qmodel, batches, max_batches=3) > 0
    observed = [q for q in qmodel.quantizers().values() if isinstance(q, ObserverQuantizer)]
    assert observed and all(q.is_initialized for q in observed)
    # the input quantizer saw batches 0..2 only: its range is that of the third (largest of those)
    first = qmodel.quantizers()[next(iter(qmodel.quantizers()))]
    if isinstance(first, ObserverQuantizer) and first.observer.__class__.__name__ == "MinMaxObserver":
        assert float(first.observer.max_val) <= float(batches[2][0].max()) + 1e-6
    for key, value in bn_free.items():  # only quantizer state changed
        torch.testing.assert_close(qmodel.state_dict()[key], value)
    with pytest.raises(ValueError, match="empty"):
        fxquant.calibrate(qmodel, [])


def test_calibrate_on_a_loader_equals_calibrate_on_its_first_batch():
    example = torch.randn(1, 1, 28, 28)
    x = torch.randn(8, 1, 28, 28)
    a = fxquant.prepare_qat(fxquant.models.resnet20(), "lsq_w4a4", example)
    b = copy.deepcopy(a)
    fxquant.calibrate(a, x)
    fxquant.calibrate(b, [(x, torch.zeros(8)), (x * 3, torch.zeros(8))])
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(ta, tb, rtol=0, atol=0, msg=name)


def test_the_kernel_applies_a_clamped_step_without_changing_the_parameter():
    x = torch.randn(50)
    step = nn.Parameter(torch.tensor([-0.5]))
    out = fake_quantize(x, step, None, -8, 7)
    torch.testing.assert_close(out, fake_quantize(x, torch.tensor([MIN_STEP]), None, -8, 7))
    assert float(step.detach()) == -0.5


def test_clamp_steps_keeps_every_learned_step_positive_in_one_call():
    q = LSQQuantizer(QuantizerConfig(bits=4, granularity="per_channel"), ch_axis=0, signed=True)
    q(torch.randn(3, 5))
    q.share_steps_across([2, 4])
    with torch.no_grad():
        q.scale.fill_(-1.0)
        q.width_steps["2"].fill_(-2.0)
    holder = nn.Sequential(q)
    clamp_steps(holder)
    floor = torch.tensor(MIN_STEP)
    assert all(torch.equal(p.detach(), torch.full_like(p, floor)) for p in (q.scale, q.width_steps["2"]))
    assert bool((q.width_steps["4"] > floor).all())  # untouched


@pytest.mark.slow
def test_fit_compiled_follows_the_eager_loss_trajectory():
    data = torch.utils.data.TensorDataset(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))
    example = torch.randn(1, 1, 28, 28)
    torch.manual_seed(0)
    eager = fxquant.prepare_qat(fxquant.models.resnet20(), "lsq_w4a4", example)
    compiled = copy.deepcopy(eager)
    config = {"epochs": 2, "batch_size": 32, "lr": 0.05}
    torch._dynamo.reset()
    runs = [
        fxquant.fit(model, data, None, config, progress=False, compile=flag)
        for model, flag in ((eager, False), (compiled, True))
    ]
    for eager_epoch, compiled_epoch in zip(*runs):
        assert compiled_epoch.train_loss == pytest.approx(eager_epoch.train_loss, rel=0.03)
    # the quantizers learned alike: float reassociation makes single channels drift, not the typical step
    drift = [
        float((compiled.quantizers()[name].scale.mean() - q.scale.mean()).abs() / q.scale.mean())
        for name, q in eager.quantizers().items()
    ]
    assert sorted(drift)[len(drift) // 2] < 0.05, drift


@pytest.mark.parametrize("mode", COMPILED_MODES)
@pytest.mark.parametrize(
    "case",
    [
        dict(shape=(4, 6, 5, 5), channels=None, offset=True, input_range=(0.0, 6.0)),  # a fused ReLU6, LSQ+
        dict(shape=(4, 6, 5, 5), channels=None, offset=False, input_range=None),
        dict(shape=(8, 3, 3, 3), channels=0, offset=False, input_range=None),  # per-channel weights
    ],
)
def test_each_compiled_mode_gives_the_eager_values_and_gradients(mode, case, monkeypatch):
    """Compiled, the quantizer's forward is traced tensor ops or the opaque op, and its backward the op
    fxquant::fake_quantize_backward (this machine's kernel) or inductor's code (FXQUANT_COMPILED_QUANTIZER):
    the same values and input gradient as eager, step gradients to rounding."""
    monkeypatch.setenv("FXQUANT_COMPILED_QUANTIZER", mode)
    torch.manual_seed(0)
    x = torch.randn(case["shape"]) * 4
    rows = 1 if case["channels"] is None else x.shape[0]
    scale = torch.rand(rows) * 0.3 + 0.05
    zero_point = torch.tensor([3.0]) if case["offset"] else None
    qmin, qmax = (0, 15) if case["offset"] or case["input_range"] else (-8, 7)
    upstream = torch.randn_like(x)

    def quantize(xs, ss, zs):
        return fake_quantize(xs, ss, zs, qmin, qmax, case["channels"], 0.05, case["input_range"])

    def gradients(fn):
        xs, ss = x.clone().requires_grad_(), scale.clone().requires_grad_()
        zs = None if zero_point is None else zero_point.clone().requires_grad_()
        y = fn(xs, ss, zs)
        (y * upstream).sum().backward()
        return y.detach(), xs.grad, ss.grad, None if zs is None else zs.grad

    torch._dynamo.reset()
    compiled = torch.compile(quantize, fullgraph=True)
    with torch.profiler.profile() as profile:
        got = gradients(compiled)
    ran = {e.key for e in profile.key_averages()}
    assert ("fxquant::fake_quantize_backward" in ran) == (mode != "traced")
    assert ("fxquant::fake_quantize" in ran) == (mode == "op")
    expected = gradients(quantize)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    for g, e in zip(got[2:], expected[2:]):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_an_unknown_compiled_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FXQUANT_COMPILED_QUANTIZER", "fast")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: fake_quantize(x, torch.tensor([0.1]), None, -8, 7), fullgraph=True)
    with pytest.raises(Exception, match="FXQUANT_COMPILED_QUANTIZER must be one of traced_forward, op, traced"):
        compiled(torch.randn(4))
