"""Which graph nodes are quantizable ops, and where their weight and activation inputs are."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.quant.layers import ConvBn, QuantizedLayer, is_quantizable_module, quantized_class
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
    F.embedding: "embedding",
}
# Embedding lookups: weight-only, quantized only where a recipe rule selects them (see passes.annotate).
EMBEDDING_OPS = ("Embedding", "embedding")
MATMUL_FUNCTIONS = {torch.matmul: "matmul", torch.bmm: "bmm", operator.matmul: "matmul"}
MATMUL_METHODS = {"matmul": "matmul", "bmm": "bmm"}
# The fused attention op: its query, key and value are quantized (its softmax output is internal; a recipe's
# quant.attention = "explicit" rewrites it into matmuls first, see passes.decompose_attention).
ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention: "sdpa"}


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
            # A layer reports its float type, quantized or not, so rules written for "Conv2d" keep matching (and
            # torch's Linear subclasses are "Linear").
            cls = type(module) if isinstance(module, QuantizedLayer) else quantized_class(module)
            return getattr(cls, "float_name", None) or cls.__name__.removeprefix("Quant")
        return None
    if node.op == "call_function":
        if _is_addmm_layer(node):
            return "addmm"
        if _is_einsum_product(node):
            return "einsum"
        return (
            WEIGHTED_FUNCTIONS.get(node.target)
            or MATMUL_FUNCTIONS.get(node.target)
            or ATTENTION_FUNCTIONS.get(node.target)
        )
    if node.op == "call_method":
        return MATMUL_METHODS.get(node.target)
    return None


def _is_einsum_product(node: fx.Node) -> bool:
    """``torch.einsum(equation, a, b)``: a product of two activations (MaxViT's attention)."""
    return (
        node.op == "call_function"
        and node.target is torch.einsum
        and len(node.args) == 3
        and isinstance(node.args[0], str)
        and all(isinstance(a, fx.Node) for a in node.args[1:])
    )


def _is_addmm_layer(node: fx.Node) -> bool:
    """``torch.addmm(bias, x, weight)`` with a stored weight: a linear layer whose weight is (in, out), as
    transformers' Conv1D computes (seen when a Conv1D is traced on its own)."""
    return (
        node.op == "call_function"
        and node.target is torch.addmm
        and len(node.args) > 2
        and isinstance(node.args[2], fx.Node)
        and node.args[2].op == "get_attr"
    )


def has_weight_arg(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in WEIGHTED_FUNCTIONS or _is_addmm_layer(node))


def functional_weight(node: fx.Node) -> fx.Node | None:
    """The weight argument of a functional conv/linear (the third of addmm), when it is a graph value."""
    if node.target is torch.addmm:
        weight = node.args[2] if len(node.args) > 2 else None
    else:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return weight if isinstance(weight, fx.Node) else None


def activation_inputs(gm: fx.GraphModule, node: fx.Node) -> list[tuple[int, fx.Node]]:
    """(argument position, node) of each activation a quantizable op reads: the input of conv/linear,
    both operands of matmul/bmm, query, key and value of fused attention."""
    kind = op_type(gm, node)
    if kind in EMBEDDING_OPS:  # its input is indices
        return []
    positions = {"matmul": (0, 1), "bmm": (0, 1), "einsum": (1, 2), "sdpa": (0, 1, 2), "addmm": (1,)}.get(kind, (0,))
    keywords = {"sdpa": ("query", "key", "value"), "addmm": (), "einsum": ()}.get(kind, ("input",))
    found = []
    for pos in positions:
        if pos < len(node.args) and isinstance(node.args[pos], fx.Node):
            found.append((pos, node.args[pos]))
        elif pos < len(keywords) and isinstance(node.kwargs.get(keywords[pos]), fx.Node):
            found.append((pos, node.kwargs[keywords[pos]]))
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
            if target == "weight":
                return ""
            # "attn.in_proj_weight" names the layer "attn.in_proj" (MultiheadAttention's packed projection)
            return target.removesuffix(".weight") if target.endswith(".weight") else target.removesuffix("_weight")
    scope = scope_of(node)
    return f"{scope}.{node.name}" if scope else node.name
