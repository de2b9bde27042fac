"""``export_onnx``: a trained QAT model as a QDQ ONNX file that onnxruntime runs, at every width from 2 to 8 bits.

How: :func:`fxquant.deploy.convert` freezes the model; the dynamo-based ``torch.onnx.export`` captures it, with
fxquant's two operators translated to placeholder nodes of an ``fxquant`` domain (torch's own fake-quantize
lowerings reject sub-8-bit ranges or drop the clamp, so they are not used); then the placeholders are rewritten
here into standard ONNX with typed integer initializers:

* weights: ``DequantizeLinear`` of an integer initializer, per channel on the weight's own axis (0 for Conv and
  Gemm, 1 for ConvTranspose): INT4/UINT4 (two per byte) at ≤ 4 bits, INT8/UINT8 at 5–8 (``format="qdq"``);
  INT8 at every width for ``format="qcdq"``. No float copy of a quantized weight is left in the file.
* activations: ``QuantizeLinear``/``DequantizeLinear``. ``qdq``: int8/uint8 at 8 bits, INT4/UINT4 at 4 (opset
  21), the next container up for 2, 3 and 5–7 bits with the range enforced by a float ``Clip`` *after*
  DequantizeLinear. ``qcdq``: int8/uint8 containers and an integer ``Clip`` between Q and DQ (opset 13 runtimes).
* a BatchNormalization right after a quantized Conv whose weight is per-channel symmetric is folded into that
  weight's scales and a bias: the integer weights stay as they are (exact in real arithmetic), and onnxruntime
  can fuse DQ → Conv → Q into an integer convolution — when asked (``fold_batch_norm=True``, see export_onnx).

Node metadata is stripped, ``onnx.checker`` (full check) must pass, and ``<path>.encodings.json`` lists every
quantized tensor's bits, scale, zero point and axis. ``onnx``, ``onnxscript`` and ``onnxruntime`` are the
``export`` extra, imported only here.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fxquant.errors import FxQuantError
from fxquant.qat_model import QATModel

from .convert import convert
from .ops import PACKED_BITS

try:  # the ``export`` extra; fxquant itself imports without it
    import onnx
    import onnxscript
    from onnx import numpy_helper
    from onnxscript import FLOAT, UINT8
except ImportError:  # pragma: no cover - depends on the environment
    onnx = onnxscript = None

DOMAIN = "fxquant"
FORMATS = ("qdq", "qcdq")

if onnxscript is not None:
    _FXQ = onnxscript.values.Opset(domain=DOMAIN, version=1)

    # Placeholders: the exporter emits one fxquant-domain node per call, rewritten by _to_standard().
    @onnxscript.script(_FXQ)
    def _quantize_dequantize(x: FLOAT, scale: FLOAT, zero_point: FLOAT, qmin: int, qmax: int, axis: int) -> FLOAT:
        return _FXQ.QDQ(x, scale, zero_point, qmin=qmin, qmax=qmax, axis=axis)

    @onnxscript.script(_FXQ)
    def _dequantize_weight(
        stored: UINT8, scale: FLOAT, zero_point: FLOAT, axis: int, bits: int, signed: bool, shape: list[int]
    ) -> FLOAT:
        return _FXQ.DQW(stored, scale, zero_point, axis=axis, bits=bits, signed=signed, shape=shape)


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote."""

    path: Path
    encodings: Path
    opset: int
    format: str
    bytes: int
    weight_widths: Counter = field(default_factory=Counter)  # bits -> quantized weights
    activation_widths: Counter = field(default_factory=Counter)  # bits -> activation Q/DQ pairs
    folded_batch_norms: int = 0


def require_onnx() -> None:
    """Raise a clear error when the ``export`` extra is missing."""
    if onnx is None:
        raise FxQuantError(
            "ONNX export needs onnx and onnxscript (and onnxruntime to check): pip install 'fxquant[export]'"
        )


def _translations() -> dict:
    """fxquant's custom ops → the placeholder nodes rewritten by :func:`_to_standard`."""
    return {
        torch.ops.fxquant.quantize_dequantize.default: _quantize_dequantize,
        torch.ops.fxquant.dequantize_weight.default: _dequantize_weight,
    }


def export_onnx(
    qmodel: QATModel,
    path: str | Path,
    example_inputs: Any,
    *,
    format: str = "qdq",
    opset: int = 21,
    dynamic_batch: bool = True,
    fold_batch_norm: bool = False,
) -> ExportReport:
    """Convert ``qmodel`` and write it to ``path`` as QDQ ONNX (see the module docstring), plus
    ``<path>.encodings.json``. ``example_inputs`` is one tensor or a tuple of forward's positional arguments. A
    model on a GPU is converted there and exported from a CPU copy (``qmodel`` stays where it is); the inputs may be
    on any device.

    ``fold_batch_norm`` folds a BatchNormalization that follows a quantized Conv into its weight scales and a
    bias, so that onnxruntime can run DQ → Conv → Q as one integer kernel. That kernel needs its bias as int32 at
    scale s_x·s_w, which onnxruntime rounds it to (ORT_ENABLE_BASIC and above): a rounding the trained model never
    saw — a W4A4 resnet20 then agrees with PyTorch on 97.4% of the test images instead of ≥ 99.9%. So it is off by
    default: the BN stays a float node and onnxruntime computes what PyTorch computes at every optimisation level.
    (Simulating the int32 bias during QAT would make folding exact; fxquant does not do that yet.)

    Example usage::

        report = fxquant.export_onnx(qmodel, "resnet20_w4a4.onnx", torch.randn(1, 1, 28, 28))
        session = onnxruntime.InferenceSession(str(report.path))
    """
    require_onnx()
    if format not in FORMATS:
        raise FxQuantError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if opset < 13:
        raise FxQuantError(f"opset {opset} has no per-channel DequantizeLinear; use opset 13 or later")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    # The ONNX file does not depend on the device: a model trained on a GPU is exported from a CPU copy.
    args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    deployed = convert(qmodel).cpu()
    model = capture(deployed, args, opset, dynamic_batch)
    report = ExportReport(Path(path), Path(f"{path}.encodings.json"), opset, format, 0)
    encodings = _to_standard(model, format, opset, report)
    report.folded_batch_norms = _fold_batch_norms(model) if fold_batch_norm else 0
    _unfuse_clip_before_4bit_quantize(model)
    if opset < model.opset_import[0].version:  # the exporter writes opset 18 at least
        _lower_opset(model, opset)
    _strip(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0]
        raise FxQuantError(f"the exported ONNX model does not pass onnx.checker at opset {opset}: {first}") from None
    report.path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(report.path))
    report.bytes = report.path.stat().st_size
    report.encodings.write_text(json.dumps(encodings, indent=1))
    return report


def capture(module: nn.Module, args: tuple, opset: int, dynamic_batch: bool = True) -> Any:
    """``module`` (a converted model, or any float model) as an ONNX ModelProto from the dynamo exporter,
    fxquant's operators as ``fxquant``-domain placeholders."""
    require_onnx()
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
    try:
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            opset_version=max(opset, 18),  # the exporter's own minimum; the rewrite below sets the final opset
            custom_translation_table=_translations(),
            dynamic_shapes=dynamic,
            verbose=False,
        )
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise FxQuantError(f"torch.onnx.export could not capture {type(module).__name__}: {first[:300]}") from err
    return program.model_proto


# -- the rewrite ------------------------------------------------------------------------------------------------
def _container(bits: int, signed: bool, format: str, opset: int) -> tuple[int, int, int]:
    """(ONNX element type, its min, its max) that holds a ``bits``-wide value."""
    t = onnx.TensorProto
    if bits <= PACKED_BITS and format == "qdq" and opset >= 21:
        return (t.INT4, -8, 7) if signed else (t.UINT4, 0, 15)
    return (t.INT8, -128, 127) if signed else (t.UINT8, 0, 255)


def _array(model: Any, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise FxQuantError(f"ONNX export: {name} is not a constant of the captured graph")


def _attrs(node: Any) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Builder:
    """New initializers and nodes, named uniquely after the tensors they come from."""

    def __init__(self, model: Any):
        self.onnx = onnx
        self.model = model
        self.names = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output}

    def name(self, base: str) -> str:
        candidate, i = base, 1
        while candidate in self.names:
            i += 1
            candidate = f"{base}_{i}"
        self.names.add(candidate)
        return candidate

    def constant(self, base: str, values: Any, elem_type: int, dims: list[int] | None = None, raw: bool = False) -> str:
        name = self.name(base)
        array = np.asarray(values)
        shape = list(array.shape) if dims is None else dims
        if raw:
            tensor = self.onnx.helper.make_tensor(name, elem_type, shape, bytes(values), raw=True)
        else:
            tensor = self.onnx.helper.make_tensor(name, elem_type, shape, array.reshape(-1).tolist())
        self.model.graph.initializer.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs: Any) -> tuple[Any, str]:
        out = self.name(base)
        return self.onnx.helper.make_node(op, inputs, [out], name=self.name(f"{base}_{op}"), **attrs), out


def _qparams(b: _Builder, node: Any, elem_type: int, axis: int, tag: str) -> tuple[str, str, np.ndarray, np.ndarray]:
    """Scale (float, scalar per tensor) and typed zero point initializers for a Q/DQ pair."""
    scale = _array(b.model, node.input[1]).astype(np.float32).reshape(-1)
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    zero = _array(b.model, zp_name).reshape(-1) if zp_name else np.zeros_like(scale)
    zero = np.rint(zero).astype(np.int64)
    per_tensor = axis < 0 or scale.size == 1
    dims = [] if per_tensor else [scale.size]
    scale_name = b.constant(f"{tag}_scale", scale[:1] if per_tensor else scale, b.onnx.TensorProto.FLOAT, dims)
    zero_name = b.constant(f"{tag}_zero_point", zero[:1] if per_tensor else zero, elem_type, dims)
    return scale_name, zero_name, scale, zero


def _to_standard(model: Any, format: str, opset: int, report: ExportReport) -> dict[str, Any]:
    """Rewrite the ``fxquant`` placeholders into standard QDQ (in place); returns the encodings."""
    b = _Builder(model)
    encodings: dict[str, Any] = {"format": format, "opset": opset, "activations": {}, "weights": {}}
    rewritten = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            rewritten.append(node)
            continue
        a = _attrs(node)
        if node.op_type == "DQW":
            nodes, entry = _weight(b, node, a, format, opset)
            encodings["weights"][node.input[0].removesuffix(".stored")] = entry
            report.weight_widths[a["bits"]] += 1
        else:
            nodes, entry = _activation(b, node, a, format, opset)
            encodings["activations"][node.input[1].removesuffix(".scale")] = entry
            report.activation_widths[entry["bits"]] += 1
        rewritten.extend(nodes)
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    _drop_unused_initializers(model)
    captured = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", captured)])
    del model.functions[:]
    return encodings


def _weight(b: _Builder, node: Any, a: dict, format: str, opset: int) -> tuple[list, dict]:
    stored = _array(b.model, node.input[0])
    bits, signed, shape, axis = a["bits"], bool(a["signed"]), list(a["shape"]), a["axis"]
    elem, _, _ = _container(bits, signed, format, opset)
    tag = node.input[0].removesuffix(".stored")
    scale_name, zero_name, scale, zero = _qparams(b, node, elem, axis, tag)
    if bits <= PACKED_BITS:
        values = np.stack([stored & 0xF, stored >> 4], axis=1).reshape(-1)[: math.prod(shape)].astype(np.int16)
        values = np.where(values >= 8, values - 16, values) if signed else values
    else:
        values = stored.astype(np.int16).reshape(-1)
    if elem in (b.onnx.TensorProto.INT4, b.onnx.TensorProto.UINT4):
        nibbles = (values & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.concatenate([nibbles, np.zeros(1, np.uint8)])
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        weight = b.constant(tag, packed.tobytes(), elem, shape, raw=True)
    else:
        weight = b.constant(tag, values.astype(np.int8 if signed else np.uint8).tobytes(), elem, shape, raw=True)
    dq_attrs = {"axis": axis} if axis >= 0 and scale.size > 1 else {}
    dq = b.onnx.helper.make_node(
        "DequantizeLinear",
        [weight, scale_name, zero_name],
        list(node.output),
        name=b.name(f"{tag}_DequantizeLinear"),
        **dq_attrs,
    )
    entry = {"bits": bits, "signed": signed, "axis": axis, "scale": scale.tolist(), "zero_point": zero.tolist()}
    return [dq], entry


def _activation(b: _Builder, node: Any, a: dict, format: str, opset: int) -> tuple[list, dict]:
    qmin, qmax, axis = a["qmin"], a["qmax"], a["axis"]
    signed = qmin < 0
    bits = round(math.log2(qmax - qmin + 1))
    elem, lo, hi = _container(bits, signed, format, opset)
    tag = node.input[1].removesuffix(".scale")
    scale_name, zero_name, scale, zero = _qparams(b, node, elem, axis, tag)
    if scale.size > 1:
        raise FxQuantError(f"{tag}: per-channel activation quantization is not exported yet")
    q_attrs = {"axis": axis} if scale.size > 1 else {}
    q, quantized = b.node("QuantizeLinear", [node.input[0], scale_name, zero_name], f"{tag}_q", **q_attrs)
    nodes = [q]
    narrower = (qmin, qmax) != (lo, hi)
    if narrower and format == "qcdq":  # integer Clip between Q and DQ: the container holds only the range
        bounds = [
            b.constant(f"{tag}_{k}", np.array(v, np.int8 if signed else np.uint8), elem, [])
            for k, v in (("qmin", qmin), ("qmax", qmax))
        ]
        clip, quantized = b.node("Clip", [quantized, *bounds], f"{tag}_clipped")
        nodes.append(clip)
    out = node.output[0] if not (narrower and format == "qdq") else b.name(f"{tag}_dq")
    nodes.append(
        b.onnx.helper.make_node(
            "DequantizeLinear", [quantized, scale_name, zero_name], [out], name=b.name(f"{tag}_DequantizeLinear")
        )
    )
    if narrower and format == "qdq":
        # The range is enforced on the dequantized value: a float Clip placed before a UINT4 QuantizeLinear
        # would break onnxruntime's Clip–Quantize fusion at ORT_ENABLE_ALL.
        low = b.constant(f"{tag}_min", np.array((qmin - zero[0]) * scale[0], np.float32), b.onnx.TensorProto.FLOAT, [])
        high = b.constant(f"{tag}_max", np.array((qmax - zero[0]) * scale[0], np.float32), b.onnx.TensorProto.FLOAT, [])
        nodes.append(b.onnx.helper.make_node("Clip", [out, low, high], list(node.output), name=b.name(f"{tag}_Clip")))
    entry = {"bits": bits, "signed": signed, "axis": None, "scale": scale.tolist(), "zero_point": zero.tolist()}
    return nodes, entry


def _unfuse_clip_before_4bit_quantize(model: Any) -> None:
    """Rewrite a ``Clip`` (ReLU6, hardtanh) that feeds a QuantizeLinear with a 4-bit zero point as Min then Max.

    Works around an onnxruntime fault: its Clip–QuantizeLinear fusion (ORT_ENABLE_ALL) reads the zero point as
    8-bit and fails to create the session on INT4/UINT4 ("Unexpected data type for QuantizeLinear input
    y_zero_point"). Min/Max compute the same values and are not fused."""
    four_bit = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    types = {i.name: i.data_type for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    rewritten = []
    clips = {
        id(producers[q.input[0]])
        for q in model.graph.node
        if q.op_type == "QuantizeLinear" and len(q.input) > 2 and types.get(q.input[2]) in four_bit
        and q.input[0] in producers and producers[q.input[0]].op_type == "Clip"
    }  # fmt: skip
    b = _Builder(model)
    for node in model.graph.node:
        if id(node) not in clips:
            rewritten.append(node)
            continue
        x, low, high = [*node.input, "", ""][:3]
        if high:
            minimum, x = b.node("Min", [x, high], f"{node.output[0]}_min")
            rewritten.append(minimum)
        if low:
            rewritten.append(onnx.helper.make_node("Max", [x, low], list(node.output), name=b.name(f"{node.name}_max")))
        else:
            rewritten.append(onnx.helper.make_node("Identity", [x], list(node.output), name=b.name(node.name)))
    del model.graph.node[:]
    model.graph.node.extend(rewritten)


def _drop_unused_initializers(model: Any) -> None:
    used = {i for n in model.graph.node for i in n.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _fold_batch_norms(model: Any) -> int:
    """Fold ``BatchNormalization`` into the preceding quantized Conv where the integers can stay: the Conv's
    weight is a per-channel symmetric DequantizeLinear on axis 0, the BN is the Conv output's only reader, and
    every γ/σ is positive (scales stay positive). Returns how many were folded."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    readers = Counter(i for n in model.graph.node for i in n.input)
    graph_outputs = {o.name for o in model.graph.output}
    folded, drop = 0, set()
    for bn in list(model.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or readers[bn.input[0]] != 1 or bn.input[0] in graph_outputs:
            continue
        dq = producers.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or readers[conv.input[1]] != 1:
            continue
        axis = _attrs(dq).get("axis", 1)
        if axis != 0 or dq.input[1] not in inits or dq.input[2] not in inits:
            continue
        if np.any(numpy_helper.to_array(inits[dq.input[2]]) != 0):
            continue
        eps = _attrs(bn).get("epsilon", 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        factor = gamma / np.sqrt(var + eps)
        if np.any(factor <= 0):
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 else 0.0
        new_scale = numpy_helper.from_array((scale * factor).astype(np.float32), name=dq.input[1] + "_bn")
        new_bias = numpy_helper.from_array(
            (beta + (bias - mean) * factor).astype(np.float32), name=conv.output[0] + "_bias"
        )
        model.graph.initializer.extend([new_scale, new_bias])
        dq.input[1] = new_scale.name
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = new_bias.name
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
        folded += 1
    keep = [n for n in model.graph.node if id(n) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    _drop_unused_initializers(model)
    return folded


_AXES_AS_INPUT_SINCE_18 = {
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
}


def _lower_opset(model: Any, opset: int) -> None:
    """Rewrite the few operators whose form changed after ``opset`` (13 at the lowest): reductions other than
    ReduceSum take their axes as an input from opset 18 and as an attribute before; Reshape's ``allowzero``
    (opset 14) goes (it matters only for empty dimensions). ONNX's own version converter has no adapter down
    from Relu-14, hence this. The full checker then verifies every node against the target opset and names
    any operator left unsupported."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in _AXES_AS_INPUT_SINCE_18 and opset < 18 and len(node.input) > 1 and node.input[1]:
            if node.input[1] not in inits:
                raise FxQuantError(f"opset {opset}: {node.op_type} has computed axes, which that opset cannot express")
            axes = numpy_helper.to_array(inits[node.input[1]]).astype(np.int64).tolist()
            del node.input[1:]
            kept = [a for a in node.attribute if a.name != "noop_with_empty_axes"]  # added with the input form
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("axes", axes)])
        if node.op_type == "Reshape" and opset < 14:
            # allowzero = 1 only differs where the target shape holds a 0 (an empty dimension)
            shape = inits.get(node.input[1])
            if shape is not None and 0 in numpy_helper.to_array(shape).tolist():
                raise FxQuantError(f"opset {opset}: a Reshape to an empty dimension cannot be expressed")
            kept = [a for a in node.attribute if a.name != "allowzero"]
            del node.attribute[:]
            node.attribute.extend(kept)
    _drop_unused_initializers(model)
    model.opset_import[0].version = opset


def _strip(model: Any) -> None:
    """No exporter metadata in the file: node metadata, doc strings, value-info names are all that is left."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.metadata_props[:]
    model.graph.doc_string = ""
    model.doc_string = ""
    del model.graph.value_info[:]
    model.producer_name = "fxquant"
