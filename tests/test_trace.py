"""Tracing with fallback: what cannot be traced becomes opaque, its children are still quantized."""

import pytest
import torch
from torch import nn

import fxquant
from fxquant import PrepareError, TraceError


class DataDependent(nn.Module):
    """Control flow on a tensor value: symbolic tracing cannot go through this forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.other(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = DataDependent()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


class LoopsOverInputs(nn.Module):
    """The root forward iterates a list argument: the root is opaque, its children are traced."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, images):
        return [self.head(self.body(img[None]).mean((2, 3))) for img in images]


def test_failing_submodule_becomes_opaque_and_its_children_are_quantized():
    qmodel = fxquant.prepare_qat(Net(), "lsq_w4a4")
    assert "block" in qmodel.report.opaque and "cannot be traced" in qmodel.report.opaque["block"]
    names = {layer.name for layer in qmodel.report.layers}
    assert {"stem", "head", "block.conv", "block.other"} <= names
    x = torch.randn(2, 3, 6, 6)
    qmodel(x).sum().backward()
    assert qmodel.model.block.conv.weight_quantizer.scale.grad is not None


def test_untraceable_root_keeps_its_class_and_output_structure():
    model = LoopsOverInputs()
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4")
    assert "" in qmodel.report.opaque and qmodel.graph_module is None
    assert isinstance(qmodel.model, LoopsOverInputs)
    out = qmodel([torch.randn(3, 5, 5), torch.randn(3, 5, 5)])
    assert isinstance(out, list) and len(out) == 2
    sum(o.sum() for o in out).backward()
    roles = {layer.name: layer.role for layer in qmodel.report.layers}
    assert roles["body.0"].startswith("first") and "last" in roles["head"]
    assert qmodel.state_dict().keys() >= {"model.body.0.weight", "model.head.weight_quantizer.scale"}


def test_leaf_modules_stay_float():
    qmodel = fxquant.prepare_qat(Net(), "lsq_w4a4", leaf_modules=["stem"])
    assert qmodel.report.opaque["stem"] == "listed in leaf_modules"
    assert "stem" not in {layer.name for layer in qmodel.report.layers}
    qmodel = fxquant.prepare_qat(Net(), "lsq_w4a4", leaf_modules=[nn.Linear])
    assert "head" not in {layer.name for layer in qmodel.report.layers}


def test_unknown_leaf_module_suggests_a_name():
    with pytest.raises(fxquant.PrepareError, match="did you mean 'stem'"):
        fxquant.prepare_qat(Net(), "lsq_w4a4", leaf_modules=["stme"])
    with pytest.raises(fxquant.RecipeError, match=r"quant\.leaf_modules\[0\]: .*did you mean 'stem'"):
        fxquant.prepare_qat(Net(), "lsq_w4a4", quant={"leaf_modules": ["stme"]})


class FunctionalOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        if x.mean() > 0:
            x = -x
        return torch.nn.functional.conv2d(x, self.w)


def test_model_that_cannot_be_traced_at_all_names_the_module_and_suggests_leaf_modules():
    with pytest.raises(TraceError) as info:
        fxquant.prepare_qat(FunctionalOnly(), "lsq_w4a4")
    message = str(info.value)
    assert "'<root>'" in message and "leaf_modules" in message and "TraceError" in message


def test_model_with_nothing_to_quantize_is_an_error():
    with pytest.raises(PrepareError, match="no layer fxquant can quantize"):
        fxquant.prepare_qat(nn.Sequential(nn.ReLU()), "lsq_w4a4")


def test_concrete_args_let_control_flow_trace():
    class Flag(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x, use_a=True):
            return self.a(x) if use_a else self.b(x)

    qmodel = fxquant.prepare_qat(Flag(), "lsq_w8a8", concrete_args={"use_a": False})
    assert qmodel.graph_module is not None
    assert {layer.name for layer in qmodel.report.layers} == {"b"}
