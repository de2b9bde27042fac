"""Attention is quantized: nn.MultiheadAttention, torchvision Swin, fused SDPA calls (fused and explicit).

With every quantizer off a prepared model computes what the original computes (against the original module
itself, the independent reference); state_dict keys stay the float model's; every product is quantized.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

import fxquant
from fxquant.quant.attention import QuantizableMultiheadAttention
from fxquant.quant.controls import disable_quant


class AttentionNet(nn.Module):
    """One MultiheadAttention called the way the drawn case says, then a linear head."""

    def __init__(self, embed: int, heads: int, batch_first: bool, kdim: int | None, dropout: float, cross: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=batch_first, kdim=kdim, vdim=kdim, dropout=dropout)
        self.head = nn.Linear(embed, 3)
        self.cross = cross

    def forward(self, x, memory, key_padding_mask, attn_mask):
        kv = memory if self.cross else x
        out, weights = self.attn(x, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        return self.head(out), weights


@st.composite
def attention_cases(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    embed = heads * draw(st.sampled_from([2, 4, 8]))
    batch, target, source = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    batch_first = draw(st.booleans())
    cross = draw(st.booleans())
    kdim = draw(st.sampled_from([None, 6])) if cross else None
    if not cross:
        source = target
    mask_kind = draw(st.sampled_from(["none", "bool", "float", "batched"]))
    padding = draw(st.booleans())
    return heads, embed, batch, target, source, batch_first, cross, kdim, mask_kind, padding, draw(st.integers(0, 99))


def _inputs(case):
    heads, embed, batch, target, source, batch_first, _cross, kdim, mask_kind, padding, seed = case
    g = torch.Generator().manual_seed(seed)
    shape = (batch, target, embed) if batch_first else (target, batch, embed)
    x = torch.randn(shape, generator=g)
    mem_dim = kdim or embed
    memory = torch.randn((batch, source, mem_dim) if batch_first else (source, batch, mem_dim), generator=g)
    attn_mask = None
    if mask_kind == "bool":
        attn_mask = torch.rand(target, source, generator=g) > 0.7
        attn_mask[:, 0] = False  # every row attends somewhere (an all-masked row is NaN in both)
    elif mask_kind == "float":
        attn_mask = torch.randn(target, source, generator=g)
    elif mask_kind == "batched":
        attn_mask = torch.randn(batch * heads, target, source, generator=g)
    key_padding_mask = None
    if padding:
        key_padding_mask = torch.rand(batch, source, generator=g) > 0.6
        key_padding_mask[:, 0] = False
    return x, memory, key_padding_mask, attn_mask


@settings(max_examples=40, deadline=None)
@given(attention_cases())
def test_mha_with_quantizers_off_equals_original(case):
    heads, embed, _batch, _target, _source, batch_first, cross, kdim, _mask, _pad, seed = case
    torch.manual_seed(seed)
    model = AttentionNet(embed, heads, batch_first, kdim, dropout=0.0, cross=cross).eval()
    inputs = _inputs(case)
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4").eval()
    with torch.no_grad(), disable_quant(qmodel):
        out, weights = qmodel(*inputs)
        ref_out, ref_weights = model(*inputs)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref_weights, atol=1e-5, rtol=1e-5)
    # the in-projection(s), both products and the out-projection are quantized
    ops = sorted(r.op for r in qmodel.report.layers)
    assert ops.count("matmul") == 2 and "Linear" in ops
    products = [r for r in qmodel.report.layers if r.op == "matmul"]
    assert all(len(r.activation_quantizers) == 2 for r in products)
    assert "attn" in qmodel.report.swapped and not qmodel.report.float_layers


def test_mha_state_dict_and_training():
    torch.manual_seed(0)
    model = AttentionNet(16, 4, True, None, dropout=0.1, cross=False)
    inputs = _inputs((4, 16, 2, 5, 5, True, False, None, "bool", True, 1))
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4")
    float_keys = set(model.state_dict())
    assert float_keys <= {k.removeprefix("model.") for k in qmodel.state_dict()}
    out, _ = qmodel(*inputs)
    out.sum().backward()
    swapped = qmodel.model.attn  # traced through: the graph holds its parameters at the same paths
    assert swapped.in_proj_weight.grad is not None and swapped.out_proj.weight.grad is not None
    # save → load into a freshly prepared model reproduces the outputs (quantizer state included)
    qmodel.eval()
    again = fxquant.prepare_qat(model, "lsq_w4a4")
    again.load_state_dict(qmodel.state_dict())
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(*inputs)[0], qmodel(*inputs)[0])
    # the caller's model is untouched
    assert type(model.attn) is nn.MultiheadAttention


def test_mha_from_float_is_still_an_mha():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    swapped = QuantizableMultiheadAttention.from_float(mha)
    assert isinstance(swapped, nn.MultiheadAttention) and swapped.in_proj_weight is mha.in_proj_weight
    assert set(swapped.state_dict()) == set(mha.state_dict())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(swapped(x, x, x)[0], mha(x, x, x)[0], atol=1e-6, rtol=1e-5)


def test_mha_rules_select_attention_products():
    model = AttentionNet(16, 4, True, None, dropout=0.0, cross=False)
    recipe = {
        "extends": "lsq_w4a4",
        "quant": {"rule": [{"match": {"type": "matmul", "name": "attn.*"}, "activation": {"bits": 8}}]},
    }
    qmodel = fxquant.prepare_qat(model, recipe)
    bits = {r.name: qmodel.layer_quantizers(r)[1][0].bits for r in qmodel.report.layers if r.op == "matmul"}
    assert bits and all(b == 8 for b in bits.values()) and all(n.startswith("attn.") for n in bits)


def test_rules_select_attention_by_its_type():
    model = AttentionNet(16, 4, True, None, dropout=0.0, cross=False)
    recipe = {
        "extends": "lsq_w4a4",
        "quant": {
            "rule": [{"match": {"type": "MultiheadAttention"}, "weight": {"bits": 8}, "activation": {"bits": 8}}]
        },
    }
    qmodel = fxquant.prepare_qat(model, recipe)
    widths = {r.name: (qmodel.layer_quantizers(r)[0], qmodel.layer_quantizers(r)[1]) for r in qmodel.report.layers}
    for name, (weight, activations) in widths.items():
        expected = 8 if name.startswith("attn.") else 4 if name != "head" else 8  # head is the last layer
        assert all(q.bits == expected for q in activations), name
        if weight is not None:
            assert weight.bits == expected, name
    assert {"attn.in_proj", "attn.out_proj", "attn.matmul", "attn.matmul_1"} <= set(widths)


def test_unsupported_mha_is_reported_float():
    model = AttentionNet(16, 4, True, None, dropout=0.0, cross=False)
    model.attn = nn.MultiheadAttention(16, 4, batch_first=True, add_zero_attn=True)
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4")
    assert "add_zero_attn" in qmodel.report.float_layers["attn"]


class FusedAttention(nn.Module):
    def __init__(self, causal: bool, gqa: bool):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.kv = nn.Linear(16, 16 if gqa else 32)
        self.out = nn.Linear(16, 4)
        self.causal, self.gqa = causal, gqa

    def forward(self, x, mask):
        q = self.q(x).unflatten(-1, (4, 4)).transpose(1, 2)
        heads = 2 if self.gqa else 4
        k, v = self.kv(x).unflatten(-1, (2, heads, -1)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if self.causal else mask, is_causal=self.causal, enable_gqa=self.gqa
        )
        return self.out(y.transpose(1, 2).flatten(-2))


@settings(max_examples=12, deadline=None)
@given(st.booleans(), st.booleans(), st.sampled_from(["fused", "explicit"]), st.integers(0, 50))
def test_sdpa_fused_and_explicit(causal, gqa, mode, seed):
    torch.manual_seed(seed)
    model = FusedAttention(causal, gqa).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.rand(5, 5) > 0.5
    mask[:, 0] = True
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4", (x, mask), quant={"attention": mode}).eval()
    with torch.no_grad(), disable_quant(qmodel):
        torch.testing.assert_close(qmodel(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)
    ops = [r.op for r in qmodel.report.layers]
    if mode == "fused":
        (sdpa,) = [r for r in qmodel.report.layers if r.op == "sdpa"]
        assert len(sdpa.activation_quantizers) == 3  # query, key, value
        assert qmodel.report.costs[sdpa.name].macs > 0
    else:
        assert ops.count("matmul") == 2 and "sdpa" not in ops
    qmodel.train()
    qmodel(x, mask).sum().backward()


def _small_swin(v2: bool) -> SwinTransformer:
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=5, **extra
    )


def test_swin_attention_quantized_and_exact_when_off():
    torch.manual_seed(0)
    for v2 in (False, True):
        model = _small_swin(v2).eval()
        x = torch.randn(2, 3, 40, 40)  # 10×10 tokens: padding and shifted windows both happen
        qmodel = fxquant.prepare_qat(model, "lsq_w4a4", x).eval()
        with torch.no_grad(), disable_quant(qmodel):
            torch.testing.assert_close(qmodel(x), model(x), atol=1e-5, rtol=1e-5)
        names = {r.name for r in qmodel.report.layers}
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        assert all(n in names for n in linears), [n for n in linears if n not in names]
        assert sum(r.op == "matmul" for r in qmodel.report.layers) == 2 * 4  # two products in each of 4 blocks
        assert not qmodel.report.float_layers
        qmodel.train()
        qmodel(x).sum().backward()


def _weight_share(model: nn.Module, quantized: set[str]) -> float:
    """Share of conv/linear weight elements (MultiheadAttention's packed projection included) quantized."""
    total = done = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            total += module.weight.numel()
            done += module.weight.numel() if name in quantized else 0
        if isinstance(module, nn.MultiheadAttention):
            total += module.in_proj_weight.numel()
            done += module.in_proj_weight.numel() if f"{name}.in_proj" in quantized else 0
    return done / total


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "swin_v2_t", "maxvit_t"])
def test_torchvision_transformers_fully_quantized(name):
    model = torchvision.models.get_model(name, weights=None)
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4")
    quantized = {r.name for r in qmodel.report.layers}
    assert _weight_share(model, quantized) == 1.0
    products = [r for r in qmodel.report.layers if r.op in ("matmul", "einsum")]
    assert len(products) >= 2 * 12 and all(len(r.activation_quantizers) == 2 for r in products)
    assert not qmodel.report.float_layers


def test_vit_with_quantized_attention_converts_and_exports(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = fxquant.models.vit_tiny().eval()
    x = torch.randn(2, 1, 28, 28)
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4", x)
    qmodel(x)  # initialise the steps
    qmodel.eval()
    with torch.no_grad():
        expected = qmodel(x)
        torch.testing.assert_close(fxquant.convert(qmodel)(x), expected)
    path = tmp_path / "vit.onnx"
    fxquant.export_onnx(qmodel, path, x)
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-4, rtol=1e-4)
