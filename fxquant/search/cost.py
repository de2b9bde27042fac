"""Cost of a prepared model: MACs and BOPs per quantized layer, model size.

BOPs of a layer = MACs per sample × weight bits × activation bits, where for a convolution
MACs = k²·C_in·(C_out/groups)·H_out·W_out (SAQ, HAWQ). Full precision counts as 32 × 32 bits.
Shapes come from one forward pass on example inputs (quantizers off, eval mode, no gradients).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fxquant.errors import PrepareError
from fxquant.qat_model import QATModel
from fxquant.quant.controls import disable_quant
from fxquant.train.devices import model_device, to_device


@dataclass
class LayerCost:
    name: str
    macs: int  # multiply-accumulates per sample, summed over every call of the layer
    calls: int

    def bops(self, weight_bits: int, activation_bits: int) -> int:
        return self.macs * weight_bits * activation_bits


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def layer_macs(gm: fx.GraphModule, node: fx.Node, op: str) -> int:
    """MACs per sample of one quantized node whose graph has been shape-propagated."""
    out = _shape(node)
    if out is None or op.lower() == "embedding":  # a lookup: no multiply-accumulates
        return 0
    if op in ("matmul", "bmm"):
        a = _shape(node.args[0])
        k = a[-1] if a else 0
        return math.prod(out[1:]) * k if len(out) > 1 else math.prod(out) * k
    if op == "einsum":  # every index of the equation is one loop: the product of their sizes, per sample
        sizes: dict[str, int] = {}
        inputs = node.args[0].replace(" ", "").split("->")[0].split(",")
        for letters, operand in zip(inputs, node.args[1:]):
            for letter, size in zip(letters, _shape(operand) or ()):
                sizes[letter] = size
        batch = out[0] if out else 1
        return math.prod(sizes.values()) // max(batch, 1) if sizes else 0
    if op == "sdpa":  # q·kᵀ and attn·v: 2 · heads · target · source · dim per sample
        q, k = _shape(node.args[0]), _shape(node.args[1])
        return 2 * math.prod(q[1:]) * k[-2] if q and k and len(q) > 1 else 0
    if node.op == "call_module":
        weight_shape = tuple(gm.get_submodule(node.target).weight.shape)
    else:
        weight_shape = _shape(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        if weight_shape is None:
            return 0
    if "transpose" in op.lower():
        source = _shape(node.args[0])
        return math.prod(weight_shape) * math.prod(source[2:]) if source else 0
    if "linear" in op.lower() or op in ("Conv1D", "addmm"):
        return math.prod(weight_shape) * math.prod(out[1:-1])
    return math.prod(weight_shape) * math.prod(out[2:])


def as_args(example_inputs: Any) -> tuple | None:
    """Example inputs as forward's positional arguments: a tuple as it is, one tensor as a 1-tuple."""
    if example_inputs is None:
        return None
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _bind(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


def measure(qmodel: QATModel, example_inputs: tuple) -> dict[str, LayerCost]:
    """Run ``qmodel`` once on ``example_inputs`` and return the cost of each quantized layer by name.

    Raises PrepareError when the inputs do not fit the model.
    """
    pieces = qmodel.graph_modules()
    calls: dict[str, list[tuple[tuple, dict]]] = {path: [] for path in pieces}
    handles = []
    for path, gm in pieces.items():

        def record(module, args, kwargs, path=path):
            calls[path].append((args, kwargs))

        handles.append(gm.register_forward_pre_hook(record, with_kwargs=True))
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad(), disable_quant(qmodel):
            try:
                qmodel(*to_device(tuple(example_inputs), model_device(qmodel)))
            except Exception as err:
                raise PrepareError(
                    f"example_inputs do not fit the model: {type(err).__name__}: {err}. "
                    "Pass a tuple of the positional arguments of forward (a single tensor is also accepted)."
                ) from err
            costs: dict[str, LayerCost] = {}
            records = {(r.piece, r.node): r for r in qmodel.report.layers}
            for path, gm in pieces.items():
                for args, kwargs in calls[path]:
                    ShapeProp(gm).propagate(*_bind(gm, args, kwargs))
                    for node in gm.graph.nodes:
                        record = records.get((path, node.name))
                        if record is None:
                            continue
                        cost = costs.setdefault(record.name, LayerCost(record.name, 0, 0))
                        cost.macs += layer_macs(gm, node, record.op)
                        cost.calls += 1
    finally:
        for handle in handles:
            handle.remove()
        qmodel.train(was_training)
    return costs
