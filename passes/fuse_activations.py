"""fuse_activations: fold a ReLU, ReLU6 or Hardtanh into the activation quantizer that is its only reader.

``bn → relu6 → quantizer → conv`` becomes ``bn → quantizer(input_clamp=(0, 6)) → conv``: the quantizer applies the
clamp itself (:func:`fxquant.quant.kernel.fake_quantize`'s ``input_range``), with the same values and gradients,
and on the fused CPU kernel inside the passes it makes anyway, so the activation function no longer costs a pass
of its own forward and another backward (mobilenet_v2 has 35 such ReLU6; see ``benchmarks/overhead.py``).
The clamp stays part of the model whatever the quantizer does: a disabled or full-precision quantizer still applies
it, and :func:`fxquant.convert` writes it back as its own op before freezing.

A function is fused only when nothing else can see the difference: the quantizer (an LSQ activation quantizer,
called once in the graph) is the function's only user, and an in-place function's input has no other reader (it
would have seen the clamped values). Taps and perturbations are inserted before this pass, so a function they read
is left alone. A recipe's ``quant.fuse_activations = false`` turns the pass off.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from fxquant.quant.quantizers import LSQQuantizer

from .context import PassContext
from .patterns import module_of

_RELU = (0.0, math.inf)
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_IN_PLACE_FUNCTIONS = {torch.relu_, F.relu_, F.hardtanh_}


def _hardtanh_range(node: fx.Node) -> tuple[float, float] | None:
    """(min_val, max_val) of an ``F.hardtanh`` call whose bounds are numbers."""
    names = ("input", "min_val", "max_val")
    values = {"min_val": -1.0, "max_val": 1.0, **dict(zip(names, node.args)), **node.kwargs}
    low, high = values["min_val"], values["max_val"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
        return None
    return float(low), float(high)


def _activation_range(gm: fx.GraphModule, node: fx.Node) -> tuple[tuple[float, float], bool] | None:
    """((low, high), in place) when ``node`` is a ReLU, ReLU6 or Hardtanh of one tensor, else None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    module = module_of(gm, node)
    if module is not None:
        # exact types: a subclass may compute something else
        if type(module) is nn.ReLU:
            return _RELU, module.inplace
        if type(module) in (nn.ReLU6, nn.Hardtanh):
            return (float(module.min_val), float(module.max_val)), module.inplace
        return None
    in_place = bool(node.kwargs.get("inplace", False))
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return _RELU, in_place or node.target in _IN_PLACE_FUNCTIONS
    if node.op == "call_function" and node.target is F.relu6:
        return (0.0, 6.0), in_place
    if node.op == "call_function" and node.target in (F.hardtanh, F.hardtanh_):
        found = _hardtanh_range(node)
        return None if found is None else (found, in_place or node.target is F.hardtanh_)
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return _RELU, node.target == "relu_"
    return None


def fuse_activations(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fold every ReLU/ReLU6/Hardtanh whose only reader is an LSQ activation quantizer into that quantizer."""
    if not ctx.recipe.quant.fuse_activations:
        return PassResult(gm, False)
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    fused: Counter[str] = Counter()
    for node in list(gm.graph.nodes):
        quantizer = module_of(gm, node)
        if (
            not isinstance(quantizer, LSQQuantizer)
            or quantizer.role != "activation"
            or quantizer.input_clamp is not None
            or calls[str(node.target)] != 1
            or not node.args
            or not isinstance(node.args[0], fx.Node)
        ):
            continue
        activation = node.args[0]
        found = _activation_range(gm, activation)
        if found is None or len(activation.users) != 1:
            continue
        (low, high), in_place = found
        source = activation.args[0]
        if in_place and len(source.users) != 1:
            continue  # the function's input is read elsewhere too, and that reader saw it clamped
        quantizer.input_clamp = (low, high)
        node.replace_input_with(activation, source)
        gm.graph.erase_node(activation)
        fused["ReLU" if (low, high) == _RELU else "ReLU6" if (low, high) == (0.0, 6.0) else "Hardtanh"] += 1
    if fused:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(fused.items()))
        ctx.note(f"fused {counts} into the activation quantizers that read them")
        gm.recompile()
    return PassResult(gm, bool(fused))
