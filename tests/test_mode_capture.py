"""Train/eval correctness: code that branches on ``self.training`` inside a traced forward is not baked in as
training mode, and every layer left float is reported with the reason. Property-tested over generated models
with mode-dependent blocks at random places."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant
from fxquant.quant.controls import disable_quant


class NoisyInTraining(nn.Module):
    """A block whose own code differs by mode (like stochastic depth): adds noise only when training."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            y = y + 0.5 * torch.randn_like(y)
        return y


class DropsInTraining(nn.Module):
    """Functional dropout with ``training=self.training``: the flag is an argument of the traced call."""

    def forward(self, x):
        return F.dropout(x, 0.5, self.training)


class Plain(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class RootBranches(nn.Module):
    """The root's own forward branches on the mode (like GoogLeNet's auxiliary outputs)."""

    def __init__(self, blocks: list[str]):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        kinds = {"noisy": NoisyInTraining, "drop": lambda c: DropsInTraining(), "plain": Plain}
        self.blocks = nn.Sequential(*(kinds[k](4) for k in blocks))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        logits = self.head(x.mean((2, 3)))
        if self.training:
            return logits, x.mean()
        return logits


class Wrapper(nn.Module):
    """Holds a mode-dependent model. (Its forward must not inspect the inner output's type: once the inner
    module runs as written, the tracer sees its output as one opaque value, the known limit of leaf modules.)"""

    def __init__(self, blocks: list[str]):
        super().__init__()
        self.inner = RootBranches(blocks)

    def forward(self, x):
        return self.inner(2 * x)


@settings(max_examples=12, deadline=None)
@given(blocks=st.lists(st.sampled_from(["noisy", "drop", "plain"]), min_size=1, max_size=4), root=st.booleans())
def test_eval_mode_is_the_originals_eval_mode(blocks, root):
    torch.manual_seed(0)
    model = RootBranches(blocks) if root else Wrapper(blocks)
    x = torch.randn(2, 1, 8, 8)
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4", x)
    # every conv/linear is quantized or listed as float with a reason
    quantized = {layer.name for layer in qmodel.report.layers}
    prefix = "" if root else "inner."
    for name in [f"{prefix}stem", f"{prefix}head"] + [
        f"{prefix}blocks.{i}.conv" for i, k in enumerate(blocks) if k != "drop"
    ]:
        assert name in quantized or name in qmodel.report.float_layers, name
    model.eval(), qmodel.eval()
    with torch.no_grad(), disable_quant(qmodel):
        torch.testing.assert_close(qmodel(x), model(x))  # same output type too: no training-only tuple
    qmodel.train()
    out = qmodel(x)
    assert isinstance(out, tuple)  # train mode still computes the training-only outputs
    qmodel.eval()
    with torch.no_grad():
        assert torch.equal(qmodel(x), qmodel(x))  # deterministic in eval, quantizers on


def test_mode_dependent_modules_are_reported_with_the_reason():
    qmodel = fxquant.prepare_qat(Wrapper(["noisy", "plain", "drop"]), "lsq_w4a4", torch.randn(2, 1, 8, 8))
    reasons = qmodel.report.opaque
    assert "reads self.training" in reasons["inner"]
    assert "reads self.training" in reasons["inner.blocks.0"]
    # inside the opaque blocks the layers are still quantized, each as its own piece
    quantized = {layer.name for layer in qmodel.report.layers}
    assert {"inner.stem", "inner.head", "inner.blocks.0.conv", "inner.blocks.1.conv"} <= quantized


class ReadsWeightsDirectly(nn.Module):
    """Like torchvision's Swin attention: the forward reads a child's weight instead of calling it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        x = F.linear(x, self.proj.weight, self.proj.bias)
        return F.dropout(x, 0.1, self.training)


class UsesDirectAndUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.attn = ReadsWeightsDirectly()
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.last = nn.Linear(4, 2)

    def forward(self, x):
        x = self.attn(self.first(x))
        x, _ = self.lstm(x)
        x, _ = self.mha(x, x, x)
        return self.last(x)


def test_layers_left_float_are_listed_with_why_and_never_claimed_quantized():
    qmodel = fxquant.prepare_qat(UsesDirectAndUnsupported(), "lsq_w4a4", torch.randn(2, 3, 4))
    quantized = {layer.name for layer in qmodel.report.layers}
    floating = qmodel.report.float_layers
    # MultiheadAttention is rewritten as traceable ops: its projections and both products are quantized
    assert quantized == {"first", "last", "mha.in_proj", "mha.out_proj", "mha.matmul", "mha.matmul_1"}
    assert "used directly by ReadsWeightsDirectly.forward" in floating["attn.proj"]
    assert "no quantized LSTM" in floating["lstm"] and "mha" not in floating
    text = fxquant.summary(qmodel, format="text")
    assert "layer left in float" in text and "attn.proj" in text


def test_prepare_errors_are_fxquant_errors():
    class Locked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.lock = threading.Lock()

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(fxquant.PrepareError, match="cannot copy Locked"):
        fxquant.prepare_qat(Locked(), "lsq_w4a4")
    with pytest.raises(fxquant.PrepareError, match="paths or types"):
        fxquant.prepare_qat(nn.Sequential(nn.Linear(3, 3)), "lsq_w4a4", leaf_modules=[3])
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with pytest.raises(fxquant.RecipeError, match=r"loss\[0\]\.layers: selector 'Conv2d' matches nothing"):
        fxquant.prepare_qat(mlp, "fpq_w4a4", torch.randn(1, 16))
