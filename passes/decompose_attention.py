"""decompose_attention: write each fused ``F.scaled_dot_product_attention`` call as its explicit ops.

With the recipe's ``quant.attention = "fused"`` (the default) a fused attention call keeps its fast kernel and
annotate quantizes its query, key and value. With ``"explicit"`` this pass replaces it by
``softmax(q·kᵀ·scale + mask)·v`` — two matmuls, so the softmax output (the left operand of the second) is
quantized too, as integer attention hardware computes it. The rewrite follows the reference semantics of
``scaled_dot_product_attention`` (bool masks select what may be attended, ``is_causal``, ``scale``,
``enable_gqa``, ``dropout_p`` applied as given); with quantizers off it equals the fused op to float rounding.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxquant.quant.attention import add_causal_mask, add_sdpa_mask, repeat_kv_heads, sdpa_scale

from .context import PassContext

_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _arguments(node: fx.Node) -> dict:
    bound = dict(_DEFAULTS)
    bound.update(zip(_PARAMETERS, node.args))
    bound.update(node.kwargs)
    return bound


def decompose_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace fused attention calls by explicit ops when the recipe asks for ``quant.attention = "explicit"``."""
    if ctx.recipe.quant.attention != "explicit":
        return PassResult(gm, False)
    modified = False
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        a = _arguments(node)
        with graph.inserting_before(node):
            key, value = a["key"], a["value"]
            if a["enable_gqa"]:
                key = graph.call_function(repeat_kv_heads, (key, a["query"]))
                value = graph.call_function(repeat_kv_heads, (value, a["query"]))
            key_t = graph.call_method("transpose", (key, -2, -1))
            scores = graph.call_function(torch.matmul, (a["query"], key_t))
            factor = graph.call_function(sdpa_scale, (a["query"], a["scale"]))
            scores = graph.call_function(operator.mul, (scores, factor))
            if a["is_causal"]:
                scores = graph.call_function(add_causal_mask, (scores,))
            if a["attn_mask"] is not None:
                scores = graph.call_function(add_sdpa_mask, (scores, a["attn_mask"]))
            probs = graph.call_function(torch.softmax, (scores, -1))
            if a["dropout_p"]:
                probs = graph.call_function(F.dropout, (probs,), {"p": a["dropout_p"], "training": True})
            out = graph.call_function(torch.matmul, (probs, value))
        out.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"})
        for made in (key_t, scores, probs):
            made.meta.setdefault("nn_module_stack", node.meta.get("nn_module_stack", {}))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        modified = True
        ctx.note(f"{node.name}: fused attention written as explicit ops (quant.attention = 'explicit')")
    if modified:
        graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
