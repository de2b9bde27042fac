"""prepare_qat's contract: input untouched, clear errors, reports, summaries, BN folding, bits at run time."""

import copy

import pytest
import torch
import torchvision
from fxquant.passes import PassContext, assign_bits
from torch import nn

import fxquant
from fxquant import PrepareError
from fxquant.config import load_recipe
from fxquant.quant.layers import ConvBn


def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def test_input_model_is_left_untouched():
    model = resnet()
    before = copy.deepcopy(model.state_dict())
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4", torch.randn(1, 3, 32, 32))
    qmodel(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(
        isinstance(m, (nn.Conv2d, nn.Linear))
        for m in model.modules()
        if hasattr(m, "weight") and not isinstance(m, nn.BatchNorm2d)
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_first_and_last_layers_found_on_the_graph():
    qmodel = fxquant.prepare_qat(resnet(), "lsq_w2a2")
    by_name = {layer.name: layer for layer in qmodel.report.layers}
    assert by_name["conv1"].role == "first" and by_name["fc"].role == "last"
    assert (by_name["conv1"].spec.weight_bits, by_name["conv1"].spec.activation_bits) == (8, 8)
    assert (by_name["layer1.0.conv1"].spec.weight_bits, by_name["layer1.0.conv1"].spec.activation_bits) == (2, 2)


@pytest.mark.parametrize("scheme", ["lsq", "observer"])
def test_an_observed_network_input_sends_no_gradient_into_the_first_convolution(scheme):
    """``first_layer.activation_scheme = "observer"``: the input's range is observed, not learned, so nothing
    needs the gradient at the first convolution's input and autograd skips that backward pass."""
    recipe = {"extends": "lsq_w4a4", "quant": {"first_layer": {"activation_scheme": scheme}}}
    qmodel = fxquant.prepare_qat(resnet(), recipe)
    x = torch.randn(2, 3, 32, 32)
    fxquant.calibrate(qmodel, x)
    by_name = {layer.name: layer for layer in qmodel.report.layers}
    assert by_name["conv1"].spec.activation.scheme == scheme
    assert by_name["layer1.0.conv1"].spec.activation.scheme == "lsq"  # only the first layer's input
    seen = []
    qmodel.model.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0].requires_grad))
    qmodel.train()(x).sum().backward()
    assert seen == [scheme != "observer"]


def test_rules_last_match_wins():
    recipe = {
        "extends": "lsq_w4a4",
        "quant": {
            "rule": [
                {"match": {"name": "layer4.*", "type": "Conv2d"}, "weight": {"bits": 2}},
                {"match": {"name": "layer4.1.*"}, "weight": {"bits": 3}},
            ]
        },
    }
    qmodel = fxquant.prepare_qat(resnet(), recipe)
    bits = {layer.name: layer.spec.weight_bits for layer in qmodel.report.layers}
    assert bits["layer4.0.conv1"] == 2 and bits["layer4.1.conv2"] == 3 and bits["layer3.0.conv1"] == 4


def test_wrong_example_inputs_give_a_clear_error():
    with pytest.raises(PrepareError, match="example_inputs do not fit the original model"):
        fxquant.prepare_qat(resnet(), "lsq_w4a4", torch.randn(1, 5, 32, 32))


def test_activation_quantizer_is_shared_by_consumers_of_one_tensor():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.a(x) + self.b(x)

    qmodel = fxquant.prepare_qat(TwoHeads(), "lsq_w4a4")
    layers = {layer.name: layer for layer in qmodel.report.layers}
    assert layers["a"].activation_quantizers == layers["b"].activation_quantizers


def test_matmul_quantizes_both_operands():
    class Attention(nn.Module):
        def forward(self, q, k):
            return torch.matmul(q, k.transpose(-1, -2))

    qmodel = fxquant.prepare_qat(Attention(), "lsq_w8a8")
    (layer,) = qmodel.report.layers
    assert layer.op == "matmul" and len(layer.activation_quantizers) == 2 and layer.weight_quantizer is None


def test_bn_folding_keeps_running_statistics_updating_and_matches_in_eval():
    model = resnet()
    qmodel = fxquant.prepare_qat(model, "lsq_w8a8", quant={"bn": "fold"})
    fused = qmodel.graph_module.conv1
    assert isinstance(fused, ConvBn)
    before = fused.bn.running_mean.clone()
    batch = torch.randn(4, 3, 32, 32)
    with fxquant.disable_quant(qmodel):
        qmodel(batch)
    model.train()(batch)  # the same statistics update on the float model
    assert not torch.equal(before, fused.bn.running_mean)
    model.eval()
    qmodel.eval()
    x = torch.randn(2, 3, 32, 32)
    with fxquant.disable_quant(qmodel):
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bn", ["keep", "fold"])
def test_a_float_state_dict_loads_by_its_own_keys(bn):
    torch.manual_seed(0)
    trained, fresh = resnet(), resnet()
    for m in trained.modules():  # give BN statistics that differ from a fresh model's
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    qmodel = fxquant.prepare_qat(fresh, "lsq_w4a4", quant={"bn": bn})
    qmodel.load_float_state_dict(trained.state_dict())
    qmodel.eval(), trained.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), fxquant.disable_quant(qmodel):
        torch.testing.assert_close(qmodel(x), trained(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(fxquant.FxQuantError, match=r"unexpected keys.*missing keys"):
        qmodel.load_float_state_dict({"nonsense.weight": torch.zeros(1)})


def test_bits_change_at_run_time_without_retracing():
    qmodel = fxquant.prepare_qat(resnet(), "lsq_w4a4")
    qmodel(torch.randn(2, 3, 32, 32))
    code = qmodel.graph_module.code
    planned = {"extends": "lsq_w4a4", "bits": {"layers": {"layer1.0.conv1": {"weight": 2, "activation": 3}}}}
    ctx = PassContext(recipe=load_recipe(planned))
    ctx.layers = {f"{r.piece}:{r.node}": r for r in qmodel.report.layers}
    assert not assign_bits(qmodel.graph_module, ctx).modified  # widths are quantizer state, not graph
    layer = next(r for r in qmodel.report.layers if r.name == "layer1.0.conv1")
    wq, aqs = qmodel.layer_quantizers(layer)
    assert wq.bits == 2 and all(q.bits == 3 for q in aqs)
    assert qmodel.graph_module.code == code
    misspelt = {"extends": "lsq_w4a4", "bits": {"layers": {"layer1.0.conv": {"weight": 2}}}}
    with pytest.raises(
        fxquant.RecipeError, match=r"bits\.layers\.\"layer1\.0\.conv\": no layer.*did you mean 'layer1\.0\.conv2"
    ):
        fxquant.prepare_qat(resnet(), misspelt)


@pytest.mark.parametrize("fmt", ["text", "markdown", "rich"])
def test_summary_reports_bits_bops_and_size(fmt, capsys):
    qmodel = fxquant.prepare_qat(resnet(), "lsq_w4a4", torch.randn(1, 3, 32, 32))
    text = fxquant.summary(qmodel, format=fmt)
    assert "conv1 [first]" in text and "fc [last]" in text and "BOPs" in text
    if fmt == "rich":
        assert "quantized ops" in capsys.readouterr().out


def test_summary_bops_match_the_formula():
    from fxquant.summary import collect

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4))
    qmodel = fxquant.prepare_qat(model, {"quant": {"weight": {"bits": 4}, "activation": {"bits": 2}}})
    rows, totals = collect(qmodel, torch.randn(1, 3, 10, 10))
    # k²·Cin·(Cout/groups)·Hout·Wout·bw·ba
    assert rows[0].bops == 9 * 3 * 8 * 10 * 10 * 4 * 2
    assert rows[1].bops == 9 * 8 * (8 // 4) * 8 * 8 * 4 * 2
    assert totals["bops_fp32"] == (9 * 3 * 8 * 100 + 9 * 8 * 2 * 64) * 32 * 32


def test_ptq_recipe_observes_without_learning():
    qmodel = fxquant.prepare_qat(resnet(), "ptq_w8a8")
    assert not any("quantizer" in name for name, _ in qmodel.named_parameters())
    qmodel(torch.randn(2, 3, 32, 32))
    assert all(q.is_initialized for q in qmodel.quantizers().values())


def test_observer_state_round_trips_into_a_fresh_model():
    model = resnet()
    qmodel = fxquant.prepare_qat(model, "ptq_w8a8")
    qmodel(torch.randn(4, 3, 32, 32))  # observe
    fresh = fxquant.prepare_qat(model, "ptq_w8a8")
    fresh.load_state_dict(qmodel.state_dict())
    qmodel.eval()
    fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), qmodel(x))
