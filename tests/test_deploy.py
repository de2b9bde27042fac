"""convert and export_onnx: the frozen model equals the prepared one exactly (invariant 6), its weights are
integers, it is capturable, and the ONNX file runs in onnxruntime close to it at every width and format."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.cli import main as cli_main
from fxquant.deploy import compare, convert, export_onnx
from fxquant.deploy.ops import pack, unpack
from fxquant.models import resnet20

from .strategies import EVERY_WIDTH, INPUT_SHAPE, GeneratedNet, feature_recipes, model_specs, recipes


def _trained(model, recipe, x, steps=2):
    """Prepared, calibrated and trained a little (so steps, offsets and BN statistics are not their starts)."""
    qmodel = fxquant.prepare_qat(model, recipe)
    fxquant.calibrate(qmodel, x)
    step = fxquant.TrainStep(qmodel, torch.optim.SGD(qmodel.parameters(), lr=0.01), teacher=model)
    for _ in range(steps):
        step(x, torch.randint(0, 10, (x.shape[0],)))
    return qmodel.eval()


@settings(max_examples=30, deadline=None)
@given(spec=model_specs(), recipe=st.one_of(recipes(bits=EVERY_WIDTH), feature_recipes()))
def test_convert_equals_the_prepared_model_exactly(spec, recipe):
    torch.manual_seed(0)
    x = torch.randn(INPUT_SHAPE)
    qmodel = _trained(GeneratedNet(spec), recipe, x)
    deployed = convert(qmodel)
    with torch.no_grad():
        assert torch.equal(deployed(x), qmodel(x))
    names = {type(m).__name__ for m in deployed.modules()}
    assert not names & {"Tap", "FeaturePerturbation", "LSQQuantizer", "ObserverQuantizer", "ConvBn"}


@pytest.mark.parametrize(
    ("recipe", "overrides"),
    [("lsq_w4a4", {}), ("lsq_w2a2", {"quant": {"bn": "fold"}}), ("ptq_w8a8", {}), ("lsq_w3a3", {})],
)
def test_resnet20_converts_exactly_and_is_capturable(recipe, overrides, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    qmodel = _trained(resnet20(), fxquant.load_recipe(recipe, overrides or None), x)
    deployed = convert(qmodel)
    with torch.no_grad():
        expected = qmodel(x)
        assert torch.equal(deployed(x), expected)
    state = deployed.state_dict()
    quantized = [k for k in state if k.endswith("weight.stored")]
    assert len(quantized) == 22 and all(not state[k].is_floating_point() for k in quantized)
    assert not any(k.endswith(".weight") and state[k].dim() > 1 for k in state), "a float conv/linear weight is left"
    torch.save(state, tmp_path / "deployed.pt")
    reloaded = convert(qmodel)
    reloaded.load_state_dict(torch.load(tmp_path / "deployed.pt", weights_only=True))
    exported = torch.export.export(deployed, (x,), strict=True)
    with torch.no_grad():
        assert torch.equal(exported.module()(x), expected)
        assert torch.equal(reloaded(x), expected)


def test_weights_are_packed_two_per_byte_at_four_bits_and_below():
    torch.manual_seed(0)
    qmodel = _trained(resnet20(), "lsq_w2a2", torch.randn(4, 1, 28, 28))
    layer = convert(qmodel).get_submodule("layer1.0.conv1")
    assert layer.weight.stored.dtype == torch.uint8
    assert layer.weight.stored.numel() == (16 * 16 * 9 + 1) // 2
    assert set(layer.weight.integers().unique().tolist()) <= {-2, -1, 0, 1}


@given(bits=st.integers(2, 8), signed=st.booleans(), size=st.integers(1, 40), seed=st.integers(0, 1000))
def test_pack_unpack_round_trips(bits, signed, size, seed):
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = torch.randint(low, high + 1, (size,), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpack(pack(values, bits, signed), bits, signed, [size]).long(), values)


def test_a_quantizer_never_initialised_is_a_clear_error():
    qmodel = fxquant.prepare_qat(resnet20(), "lsq_w4a4")
    with pytest.raises(fxquant.FxQuantError, match=r"quantizer \S+ was never initialised.*fxquant\.calibrate"):
        convert(qmodel)


def small_cnn() -> torch.nn.Module:
    """Conv-BN-ReLU ×3 (one depthwise, one residual-free downsampling) and a classifier: every exported op kind
    of resnet20, a fraction of its export time."""

    def block(cin, cout, **kw):
        return [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]

    torch.manual_seed(0)
    return torch.nn.Sequential(
        *block(1, 8, stride=2), *block(8, 8, groups=8), *block(8, 16, stride=2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    )  # fmt: skip


SMALL_LAYERS = 4


def _exported(tmp_path, bits, fmt, fold=False, model=small_cnn):
    torch.manual_seed(0)
    recipe = {"extends": "lsq_w8a8", "quant": {"weight": {"bits": bits}, "activation": {"bits": bits}}}
    x = torch.randn(16, 1, 28, 28)
    qmodel = _trained(model(), recipe, x)
    opset = 21 if fmt == "qdq" else 13
    path = tmp_path / f"w{bits}_{fmt}_{fold}.onnx"
    return qmodel, export_onnx(qmodel, path, x[:1], format=fmt, opset=opset, fold_batch_norm=fold), x


@pytest.mark.parametrize("fmt", ["qdq", "qcdq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_onnx_export_at_every_width_and_format(tmp_path, bits, fmt):
    qmodel, report, x = _exported(tmp_path, bits, fmt)
    model = onnx.load(str(report.path))
    assert {o.domain for o in model.opset_import} == {""} and model.opset_import[0].version == report.opset
    assert not any(n.metadata_props for n in model.graph.node)
    types = onnx.TensorProto
    packed = bits <= 4 and fmt == "qdq"
    weights = [i for i in model.graph.initializer if i.name.endswith(".weight") and len(i.dims) > 1]
    assert len(weights) == SMALL_LAYERS
    assert {i.data_type for i in weights} == ({types.INT4} if packed else {types.INT8})
    floats = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type == types.FLOAT)
    assert floats < 0.2 * sum(int(np.prod(i.dims)) for i in weights), "a float copy of the weights is in the file"
    assert report.weight_widths == {bits: SMALL_LAYERS} and report.activation_widths == {bits: SMALL_LAYERS}
    encodings = json.loads(report.encodings.read_text())
    assert len(encodings["weights"]) == SMALL_LAYERS and all(e["bits"] == bits for e in encodings["weights"].values())
    # Parity on random inputs to a barely trained model (near-tied logits); the slow suite checks a trained one
    # on real data.
    for parity in compare(report.path, convert(qmodel), x):
        assert parity.output_steps <= 64 and parity.top1_agreement >= 0.9, parity
    # With BN folded, onnxruntime's optimisations round conv biases to int32 (see export_onnx), so only the
    # unoptimised session is held to the bound.
    _, folded, _ = _exported(tmp_path, bits, fmt, fold=True)
    assert folded.folded_batch_norms == 3
    (parity,) = compare(folded.path, convert(qmodel), x, levels=("disable_all",))
    assert parity.output_steps <= 64 and parity.top1_agreement >= 0.9, parity


def test_a_w4a4_file_is_at_most_a_quarter_of_the_fp32_file(tmp_path):
    from fxquant.cli.export import float_onnx_size

    _, report, x = _exported(tmp_path, 4, "qdq", model=resnet20)
    fp32_bytes, _ = float_onnx_size(resnet20(), x[:1])
    assert report.bytes <= 0.25 * fp32_bytes


def test_export_runs_any_batch_size(tmp_path):
    qmodel, report, _ = _exported(tmp_path, 4, "qdq")
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        (parity,) = compare(report.path, convert(qmodel), x, levels=("disable_all",))
        assert parity.max_abs < 1e-3


def test_cli_export_prints_the_table(tmp_path, capsys):
    torch.manual_seed(0)
    qmodel = _trained(resnet20(), "lsq_w4a4", torch.randn(8, 1, 28, 28))
    fxquant.save(qmodel, tmp_path / "ck.pt")
    code = cli_main(
        ["export", "--model", "resnet20", "--checkpoint", str(tmp_path / "ck.pt"), "--out", str(tmp_path / "m.onnx")]
    )
    out = capsys.readouterr().out
    assert code == 0 and "FP32 ONNX" in out and "4 bits: 20" in out and "enable_all" in out
    assert (tmp_path / "m.onnx.encodings.json").is_file()


class ViTBlock(torch.nn.Module):
    """A pre-norm transformer block written with linears and matmuls (what fxquant traces inside ViTs)."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.embed = torch.nn.Conv2d(1, dim, 7, stride=7)
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        self.head = torch.nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # (N, 16 tokens, dim)
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.matmul(q, k.transpose(-2, -1)).mul(0.5).softmax(-1)
        x = x + self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(n, t, d))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


@pytest.mark.parametrize("build", [fxquant.models.mobilenet_v2_small, ViTBlock])
@pytest.mark.parametrize("recipe", ["lsq_w4a4", "lsq_w2a2"])
def test_mobilenet_and_a_vit_block_convert_exactly_and_export(build, recipe, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    qmodel = _trained(build(), recipe, x)
    deployed = convert(qmodel)
    with torch.no_grad():
        assert torch.equal(deployed(x), qmodel(x))
    report = export_onnx(qmodel, tmp_path / "m.onnx", x[:1])
    (parity,) = compare(report.path, deployed, x, levels=("disable_all",))
    assert parity.output_steps <= 64, parity


def test_relu6_before_a_4_bit_quantizer_runs_in_onnxruntime_at_every_level(tmp_path):
    """onnxruntime's Clip–QuantizeLinear fusion fails on a 4-bit zero point; the export writes ReLU6 as Min/Max."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU6(),
        torch.nn.Conv2d(4, 4, 3),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(10),
    )
    x = torch.randn(8, 1, 12, 12)
    model(x)
    qmodel = _trained(model, "lsq_w4a4", x)
    report = export_onnx(qmodel, tmp_path / "relu6.onnx", x[:1])
    assert "Clip" not in {n.op_type for n in onnx.load(str(report.path)).graph.node}
    for parity in compare(report.path, convert(qmodel), x):
        assert parity.output_steps <= 64, parity
