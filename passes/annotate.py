"""annotate: attach a QuantSpec to every quantizable node, from the recipe.

Precedence, lowest first: the recipe's ``quant.weight`` / ``quant.activation``; ``first_layer`` /
``last_layer``; then ``[[quant.rule]]`` in order (the last matching rule wins, key by key).

First and last layers are found on the graph, not by name: a first layer has no quantizable op upstream of
it, a last layer none downstream. (When the model's own forward could not be traced and it was split into
pieces, the caller says in ``ctx.resolve_first`` / ``ctx.resolve_last`` which pieces hold them.)
"""

from __future__ import annotations

from dataclasses import replace

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxquant.quant.spec import QuantSpec

from .context import PassContext
from .patterns import EMBEDDING_OPS, has_weight_arg, layer_name, op_type

SPEC_KEY = "fxquant_spec"
LAYER_KEY = "fxquant_layer"
ROLE_KEY = "fxquant_role"


def quantizable_nodes(gm: fx.GraphModule, embeddings: bool = False) -> list[fx.Node]:
    """Nodes of quantizable ops; embedding lookups only when asked (they are opt-in, and never first or last)."""
    return [n for n in gm.graph.nodes if (op := op_type(gm, n)) is not None and (embeddings or op not in EMBEDDING_OPS)]


def _reach(nodes: list[fx.Node], forward: bool) -> set[fx.Node]:
    """Quantizable nodes that have another quantizable node downstream (forward) / upstream."""
    targets = set(nodes)
    hit: set[fx.Node] = set()
    for start in nodes:
        stack = list(start.users) if forward else list(start.all_input_nodes)
        seen: set[fx.Node] = set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in targets:
                hit.add(start)
                break
            stack.extend(n.users if forward else n.all_input_nodes)
    return hit


def graph_roles(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """'first', 'last' or 'first+last' for the quantizable nodes at the ends of the graph."""
    nodes = quantizable_nodes(gm)
    has_downstream = _reach(nodes, forward=True)
    has_upstream = _reach(nodes, forward=False)
    roles = {}
    for n in nodes:
        parts = [r for r, ok in (("first", n not in has_upstream), ("last", n not in has_downstream)) if ok]
        if parts:
            roles[n] = "+".join(parts)
    return roles


def _attention_scope(name: str, scopes: dict[str, str]) -> str | None:
    """The attention type (``MultiheadAttention``, ``LlamaAttention``) of the innermost swapped attention module
    that holds layer ``name``, so that ``type = "MultiheadAttention"`` selects its projections and products."""
    holders = [p for p in scopes if not p or name == p or name.startswith(f"{p}.")]
    return scopes[max(holders, key=len)] if holders else None


def annotate(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Set ``node.meta['fxquant_spec']`` on every quantizable node. Idempotent: specs are recomputed. Node metadata
    only: the graph is not modified."""
    quant = ctx.recipe.quant
    roles = graph_roles(gm)  # leaf_modules layers still count as ends: the layer after them is not "first"
    for node in quantizable_nodes(gm, embeddings=True):
        kind = op_type(gm, node)
        name = ctx.qualify(layer_name(gm, node))
        if node.op == "call_module" and name in ctx.keep_float:
            continue
        if kind in EMBEDDING_OPS and not any(r.matches(name, kind) for r in quant.rules):
            continue  # embeddings stay float unless a rule selects them
        weighted = node.op == "call_module" or has_weight_arg(node)
        weight = quant.weight if weighted else None
        activation = quant.activation
        applied: list[str] = []
        role = roles.get(node, "")
        role = "+".join(r for r in role.split("+") if r and getattr(ctx, f"resolve_{r}"))
        for end in role.split("+") if role else ():
            ends = quant.first_layer if end == "first" else quant.last_layer
            if weight is not None and ends.weight_bits is not None:
                weight = weight.with_bits(ends.weight_bits)
            if ends.activation_bits is not None:
                activation = activation.with_bits(ends.activation_bits)
            if ends.activation_scheme is not None:
                activation = replace(activation, scheme=ends.activation_scheme)
            if ends:
                applied.append(f"{end}_layer")
        base_type = kind.split("+")[0]
        scope = _attention_scope(name, ctx.attention_scopes)
        for rule in quant.rules:
            if rule.matches(name, base_type) or rule.matches(name, kind) or (scope and rule.matches(name, scope)):
                ctx.matched_rules.add(rule.index)
                if weight is not None:
                    weight = rule.weight.apply(weight)
                activation = rule.activation.apply(activation)
                applied.append(rule.key_path)
        node.meta[SPEC_KEY] = QuantSpec(weight=weight, activation=activation, rules=tuple(applied))
        node.meta[LAYER_KEY] = name
        node.meta[ROLE_KEY] = role
    return PassResult(gm, False)
