"""fuse_activations: a ReLU/ReLU6/Hardtanh read only by an activation quantizer is folded into it, with the same
values and gradients as the unfused graph (bit for bit in values and the input gradient), kept where anything else
could see the difference, applied when the quantizer is off, and written back by convert."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant
from fxquant.deploy import convert
from fxquant.quant.quantizers import FakeQuantizer

from ..strategies import INPUT_SHAPE, GeneratedNet, ModelSpec, models, recipes


def _inputs(seed: int = 0) -> torch.Tensor:
    """Large enough that ReLU6 and Hardtanh saturate often."""
    return 8 * torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


def _clamps(qmodel) -> list[tuple[float, float]]:
    return [m.input_clamp for m in qmodel.modules() if isinstance(m, FakeQuantizer) and m.input_clamp is not None]


def _activation_nodes(gm) -> list[str]:
    """The graph's ReLU/ReLU6/Hardtanh calls (functions, methods and modules)."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            target = type(gm.get_submodule(node.target)).__name__
        else:
            target = getattr(node.target, "__name__", str(node.target))
        if node.op != "get_attr" and ("relu" in target.lower() or "hardtanh" in target.lower()):
            found.append(node.name)
    return found


def _unfused(model, recipe):
    return fxquant.prepare_qat(model, recipe, quant={**recipe.get("quant", {}), "fuse_activations": False})


def _step(qmodel, x):
    leaf = x.clone().requires_grad_()
    out = qmodel(leaf)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {name: p.grad for name, p in qmodel.named_parameters() if p.grad is not None}
    return out.detach(), leaf.grad, grads


_SATURATING = GeneratedNet(ModelSpec(("conv", "relu", "conv", "bn", "relu6", "dwconv"), (4,) * 6, False, 0))


@settings(max_examples=40, deadline=None)
@given(model=models(), recipe=recipes(), native=st.booleans())
@example(model=_SATURATING, recipe={"name": "lsq", "quant": {"bn": "keep"}}, native=False)
@example(model=_SATURATING, recipe={"name": "lsq", "quant": {"bn": "keep"}}, native=True)
def test_fused_and_unfused_graphs_compute_the_same(model, recipe, native):
    """Train-mode forward and backward after calibration: outputs and input gradients identical, parameter (and
    step) gradients equal to rounding, whichever kernel runs."""
    fused, unfused = fxquant.prepare_qat(model, recipe), _unfused(model, recipe)
    x = _inputs()
    fxquant.calibrate(fused, [x])
    unfused.load_state_dict(fused.state_dict())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FXQUANT_NATIVE_KERNEL", "1" if native else "0")
        out, grad_x, grads = _step(fused, x)
        out_ref, grad_x_ref, grads_ref = _step(unfused, x)
    assert torch.equal(out, out_ref)
    assert torch.equal(grad_x, grad_x_ref)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


@settings(max_examples=20, deadline=None)
@given(model=models(), recipe=recipes())
def test_a_fused_model_calibrates_like_the_unfused_one(model, recipe):
    """Initialisation (signedness and steps) sees the clamped tensor, as it saw the activation's output."""
    fused, unfused = fxquant.prepare_qat(model, recipe), _unfused(model, recipe)
    x = _inputs(3)
    fxquant.calibrate(fused, [x])
    fxquant.calibrate(unfused, [x])
    state, reference = fused.state_dict(), unfused.state_dict()
    assert state.keys() == reference.keys()
    for key, value in state.items():
        assert torch.equal(value, reference[key]), key


class Activations(nn.Module):
    """Each activation form the pass recognises, each in front of a conv."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(7))
        self.relu6 = nn.ReLU6(inplace=True)
        self.hardtanh = nn.Hardtanh(-0.5, 1.5)

    def forward(self, x):
        c = self.convs
        x = c[1](F.relu(c[0](x)))
        x = c[2](self.relu6(x))
        x = c[3](F.hardtanh(x, max_val=2.0, min_val=-1.0))
        x = c[4](x.relu())
        x = c[5](self.hardtanh(x))
        return c[6](F.relu6(x))


def test_every_form_is_fused_with_its_range():
    qmodel = fxquant.prepare_qat(Activations(), "lsq_w4a4", 8 * torch.randn(2, 4, 6, 6))
    assert sorted(_clamps(qmodel)) == sorted(
        [(0.0, math.inf), (0.0, 6.0), (-1.0, 2.0), (0.0, math.inf), (-0.5, 1.5), (0.0, 6.0)]
    )
    assert _activation_nodes(qmodel.graph_module) == []
    notes = [note for record in qmodel.report.passes if record.name == "fuse_activations" for note in record.notes]
    assert notes == ["fused 2 Hardtanh, 2 ReLU, 2 ReLU6 into the activation quantizers that read them"]


class SharedInput(nn.Module):
    """An in-place ReLU whose input is read again afterwards (it sees the clamped values), and a ReLU whose output
    also feeds an add."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.a(x)
        z = self.b(self.relu(y)) + y  # y was clamped in place: the add reads the clamped tensor
        r = torch.relu(z)
        return self.c(r) + r


def test_a_function_something_else_reads_is_kept():
    model = SharedInput()
    x = 8 * torch.randn(2, 4, 6, 6)
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4", x)
    assert _clamps(qmodel) == []
    with fxquant.disable_quant(qmodel):
        assert torch.equal(qmodel(x), model(x))


def test_a_tapped_activation_is_kept():
    """The penultimate tap reads the ReLU's output, so the ReLU keeps its node."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    recipe = {"name": "tapped", "taps": {"feat": "penultimate"}}
    qmodel = fxquant.prepare_qat(model, recipe, torch.randn(2, 16))
    assert _clamps(qmodel) == []
    assert _clamps(fxquant.prepare_qat(model, "lsq_w4a4", torch.randn(2, 16))) == [(0.0, math.inf)]


def test_the_recipe_can_turn_it_off():
    qmodel = fxquant.prepare_qat(
        Activations(), "lsq_w4a4", 8 * torch.randn(2, 4, 6, 6), quant={"fuse_activations": False}
    )
    assert _clamps(qmodel) == []
    assert len(_activation_nodes(qmodel.graph_module)) == 6


@pytest.mark.parametrize("bits", [4, 32])
def test_a_quantizer_off_or_at_full_precision_still_applies_its_activation(bits):
    model = Activations()
    x = 8 * torch.randn(2, 4, 6, 6)
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4", x)
    fxquant.calibrate(qmodel, [x])
    if bits == 32:
        for m in qmodel.modules():
            if isinstance(m, FakeQuantizer):
                m.bits = 32
        assert torch.equal(qmodel(x), model(x))
    with fxquant.disable_quant(qmodel):
        assert torch.equal(qmodel(x), model(x))


def test_convert_writes_the_activation_back_as_its_own_op():
    model = Activations()
    x = 8 * torch.randn(2, 4, 6, 6)
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4", x)
    fxquant.calibrate(qmodel, [x])
    qmodel.eval()
    deployed = convert(qmodel)
    code = deployed.code
    assert code.count("torch.relu(") == 2 and code.count("torch.clamp(") == 4
    with torch.no_grad():
        assert torch.equal(deployed(x), qmodel(x))
    assert len(_clamps(qmodel)) == 6  # the prepared model keeps its fused quantizers
