"""Grouped int4 weights and per-token dynamic activations (LLM QAT, torchao's "8da4w"), and the llm recipes.

References: a plain formula written here, and torchao's own fake quantizers when torchao is installed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant
from fxquant.quant import QuantizerConfig, make_quantizer
from fxquant.quant.quantizers import DynamicQuantizer, LSQQuantizer


def _grouped_reference(w: torch.Tensor, scale: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """round(w/s) clamped to the signed grid, times s, with one s per row slice of ``group`` elements."""
    rows = w.reshape(-1, group)
    q = torch.clamp(torch.round(rows / scale[:, None]), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * scale[:, None]).reshape(w.shape)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([8, 16, 32]), st.integers(1, 4), st.integers(1, 6), st.sampled_from([2, 3, 4, 8]))
def test_per_group_weight_matches_formula(group, groups_per_row, out, bits):
    torch.manual_seed(group * 100 + out)
    w = torch.randn(out, group * groups_per_row)
    q = make_quantizer(QuantizerConfig(bits=bits, granularity="per_group", group_size=group), "weight")
    assert isinstance(q, LSQQuantizer)
    y = q(w)  # initialises one step per group
    assert q.scale.shape == (out * groups_per_row,)
    torch.testing.assert_close(y, _grouped_reference(w, q.scale.detach(), group, bits))
    # at most 2^b levels in each group, and the gradient reaches every group's step
    for row in (y / q.scale.detach().repeat_interleave(group).reshape(w.shape)).reshape(-1, group):
        assert row.round().unique().numel() <= 2**bits
    y.sum().backward()
    assert q.scale.grad is not None and q.scale.grad.shape == q.scale.shape


def _token_reference(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = rows.abs().amax(1, keepdim=True).clamp(min=1e-8) / qmax
        return (torch.clamp(torch.round(rows / scale), -qmax - 1, qmax) * scale).reshape(x.shape)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = rows.amin(1, keepdim=True).clamp(max=0), rows.amax(1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-8)
    zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return ((torch.clamp(torch.round(rows / scale) + zero, qmin, qmax) - zero) * scale).reshape(x.shape)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 7), st.integers(2, 40), st.sampled_from([4, 8]), st.booleans())
def test_per_token_dynamic_matches_formula(batch, tokens, features, bits, symmetric):
    torch.manual_seed(batch * 1000 + tokens * 10 + features)
    x = (torch.randn(batch, tokens, features) * torch.rand(batch, tokens, 1) * 5).requires_grad_()
    q = make_quantizer(QuantizerConfig(bits=bits, granularity="per_token", symmetric=symmetric), "activation")
    assert isinstance(q, DynamicQuantizer) and not list(q.parameters())
    y = q(x)
    torch.testing.assert_close(y, _token_reference(x.detach(), bits, symmetric))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # straight through: every value is inside its range


def test_against_torchao_fake_quantizers():
    torchao_qat = pytest.importorskip("torchao.quantization.qat")
    fake_quantizer = pytest.importorskip("torchao.quantization.qat.fake_quantizer")
    torch.manual_seed(0)
    # int8 per-token asymmetric activations
    x = torch.randn(4, 9, 64) * 3
    ours = make_quantizer(QuantizerConfig(bits=8, granularity="per_token", symmetric=False), "activation")(x)
    theirs = fake_quantizer.IntxFakeQuantizer(
        torchao_qat.IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    )(x)
    step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / 255
    # the zero point may round the other way where torchao picks it from the max side: at most one step apart
    assert ((ours - theirs).abs() <= step * 1.001).all()
    assert (ours == theirs).float().mean() > 0.99
    # int4 weights, groups of 32: with torchao's step (max|w| / 7.5) our quantizer gives torchao's values
    w = torch.randn(16, 128)
    q = make_quantizer(QuantizerConfig(bits=4, granularity="per_group", group_size=32), "weight")
    q(w)
    q.scale.data = w.reshape(-1, 32).abs().amax(1) / 7.5
    theirs = fake_quantizer.IntxFakeQuantizer(
        torchao_qat.IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
    )(w)
    torch.testing.assert_close(q(w), theirs, atol=1e-6, rtol=1e-5)


def test_granularity_belongs_to_its_role():
    with pytest.raises(fxquant.RecipeError, match="per_token"):
        fxquant.load_recipe({"extends": "lsq_w4a4", "quant": {"weight": {"granularity": "per_token"}}})
    with pytest.raises(fxquant.RecipeError, match="per_group"):
        fxquant.load_recipe({"extends": "lsq_w4a4", "quant": {"activation": {"granularity": "per_group"}}})
    with pytest.raises(fxquant.RecipeError, match="group_size"):
        fxquant.load_recipe({"extends": "llm_w4a8", "quant": {"weight": {"group_size": 0}}})
    with pytest.raises(fxquant.RecipeError, match="per_group"):
        fxquant.load_recipe({"extends": "llm_w4a8", "quant": {"weight": {"scheme": "observer"}}})


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.up = nn.Linear(64, 96)
        self.odd = nn.Linear(96, 40)  # 96 = 3 groups of 32
        self.head = nn.Linear(40, 50)  # 40 rows do not split into groups of 32: per channel

    def forward(self, ids):
        return self.head(torch.relu(self.odd(torch.relu(self.up(self.embed(ids))))))


@pytest.mark.parametrize("recipe", ["llm_w4a8", "llm_w4"])
def test_llm_recipes_prepare_and_train(recipe):
    ids = torch.randint(0, 50, (2, 7))
    qmodel = fxquant.prepare_qat(TinyLM(), recipe, ids)
    weights = {r.name: qmodel.layer_quantizers(r)[0] for r in qmodel.report.layers}
    assert weights["up"].group_size == 32 and weights["odd"].group_size == 32
    assert weights["head"].group_size is None and weights["head"].ch_axis == 0
    assert any("head: per_group weights fall back to per_channel" in n for n in qmodel.report.notes)
    acts = [q for r in qmodel.report.layers for q in qmodel.layer_quantizers(r)[1]]
    if recipe == "llm_w4a8":
        assert all(isinstance(q, DynamicQuantizer) and q.bits == 8 for q in acts)
    else:
        assert all(not q.is_active for q in acts)
    assert "embed" in qmodel.report.float_layers  # embeddings stay float
    loss = qmodel(ids).logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss) and weights["up"].scale.grad is not None


class ScaledLinear(nn.Module):
    """A user's own layer type: a linear layer with a fixed output scale."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.gain = 2.0

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * self.gain


class QuantScaledLinear(fxquant.QuantizedLayer, ScaledLinear):
    def forward(self, x):
        return torch.nn.functional.linear(x, self.quantized_weight()) * self.gain


def test_registered_layer_type_is_quantized_inside_untraceable_code():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ScaledLinear(8, 8)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: cannot be traced
                return self.inner(x)
            return self.inner(-x)

    fxquant.register_layer_type(ScaledLinear, QuantScaledLinear)
    with pytest.raises(TypeError, match="QuantizedLayer"):
        fxquant.register_layer_type(ScaledLinear, nn.Linear)
    model = nn.Sequential(nn.Linear(8, 8), Opaque())
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4", torch.randn(2, 8))
    assert "1.inner" in {r.name for r in qmodel.report.layers}
    assert "quantized by module swap" in qmodel.report.swapped["1.inner"]
    with torch.no_grad(), fxquant.disable_quant(qmodel):
        x = torch.randn(2, 8)
        torch.testing.assert_close(qmodel(x), model(x))
