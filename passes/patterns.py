"""Which graph nodes are quantizable ops, and where their weight and activation inputs are."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.quant.layers import ConvBn, is_quantizable_module
from fxquant.quant.quantizers import FakeQuantizer
from fxquant.quant.taps import FeaturePerturbation

WEIGHTED_FUNCTIONS = {
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d",
    F.linear: "linear",
}
MATMUL_FUNCTIONS = {torch.matmul: "matmul", torch.bmm: "bmm", operator.matmul: "matmul"}
MATMUL_METHODS = {"matmul": "matmul", "bmm": "bmm"}


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def op_type(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The op's type name if ``node`` is a quantizable op, else None."""
    if node.op == "call_module":
        module = module_of(gm, node)
        if is_quantizable_module(module):
            if isinstance(module, ConvBn):
                return f"{type(module.conv).__name__.removeprefix('Quant')}+BN"
            # A quantized layer reports its float type, so rules written for "Conv2d" keep matching.
            return type(module).__name__.removeprefix("Quant")
        return None
    if node.op == "call_function":
        return WEIGHTED_FUNCTIONS.get(node.target) or MATMUL_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return MATMUL_METHODS.get(node.target)
    return None


def has_weight_arg(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in WEIGHTED_FUNCTIONS


def functional_weight(node: fx.Node) -> fx.Node | None:
    """The weight argument of a functional conv/linear, when it is a graph value."""
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return weight if isinstance(weight, fx.Node) else None


def activation_inputs(gm: fx.GraphModule, node: fx.Node) -> list[tuple[int, fx.Node]]:
    """(argument position, node) of each activation a quantizable op reads: the input of conv/linear,
    both operands of matmul/bmm."""
    positions = (0, 1) if op_type(gm, node) in ("matmul", "bmm") else (0,)
    found = []
    for pos in positions:
        if pos < len(node.args) and isinstance(node.args[pos], fx.Node):
            found.append((pos, node.args[pos]))
        elif pos == 0 and isinstance(node.kwargs.get("input"), fx.Node):
            found.append((pos, node.kwargs["input"]))
    return found


def is_quantizer_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantizer)


def is_perturbation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A FPQ feature-perturbation node (it sits between an activation quantizer and its op)."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), FeaturePerturbation)


def quantized_source(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The quantizer node an op's input comes from (looking through a perturbation), or None."""
    if is_perturbation(gm, node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node if is_quantizer_node(gm, node) else None


def scope_of(node: fx.Node) -> str:
    """The qualified name of the module whose forward created ``node`` (from fx's module stack)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    key, value = list(stack.items())[-1]
    return str(value[0]) if isinstance(value, tuple) and value else str(key)


def layer_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A stable, readable name for a quantizable op: the module path for a module call; for functional
    forms the weight's attribute path, or the enclosing module's path and the node name."""
    if node.op == "call_module":
        return str(node.target)
    if has_weight_arg(node):
        weight = functional_weight(node)
        if weight is not None and is_quantizer_node(gm, weight) and isinstance(weight.args[0], fx.Node):
            weight = weight.args[0]  # the same name before and after quantizers are inserted
        if weight is not None and weight.op == "get_attr":
            target = str(weight.target)
            # A conv traced on its own reads "weight": its name is then the piece's own path ("").
            return "" if target == "weight" else target.removesuffix(".weight")
    scope = scope_of(node)
    return f"{scope}.{node.name}" if scope else node.name
