"""insert_taps and insert_perturbations: the feature side of a recipe.

``insert_taps`` adds, for each ``(name, selector)`` of the recipe's ``features.taps``, a
:class:`fxquant.quant.taps.Tap` node on a side branch (no users) of each matching node. Selectors:

* ``penultimate`` — the float input of the last quantized layer (the classifier's features);
* ``output`` — the model's output (its first tensor, root graph only);
* ``module:NAME`` — the output of module NAME (a leaf call, or the last node created inside its forward);
* ``input:NAME`` — the input of module NAME;
* ``type:TYPE`` — the output of every quantized op of that type (``Conv2d``, ``Linear``, ``matmul``; case-
  insensitive, ``Conv2d`` also matches a folded ``Conv2d+BN``) or module of that class name; the tap then
  holds a dict from layer name to tensor.

``insert_perturbations`` puts a :class:`fxquant.quant.taps.FeaturePerturbation` between each matching quantized op and
the activation quantizer that feeds it (one per op: the Bernoulli draw is per layer).
Both are idempotent and count their matches in ``ctx.tap_matches`` so that a selector matching nothing in any
piece is reported by the API as a recipe error.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxquant.quant.taps import FeaturePerturbation, Tap, parse_selector

from .context import PassContext
from .patterns import is_perturbation, is_quantizer_node, scope_of

TAP_PREFIX = "_fxquant_tap_"
PERTURB_PREFIX = "_fxquant_perturb_"


def _float_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The tensor an op reads, before its activation quantizer (and perturbation), if any."""
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    while source is not None and (is_quantizer_node(gm, source) or is_perturbation(gm, source)):
        source = source.args[0] if isinstance(source.args[0], fx.Node) else None
    return source


def _piece_layers(gm: fx.GraphModule, ctx: PassContext) -> list[tuple[fx.Node, object]]:
    by_name = {n.name: n for n in gm.graph.nodes}
    return [(by_name[r.node], r) for r in ctx.layers.values() if r.piece == ctx.piece and r.node in by_name]


def _type_matches(op: str, wanted: str) -> bool:
    op, wanted = op.lower(), wanted.lower()
    return op == wanted or op.startswith(wanted + "+")


def _in_scope(node: fx.Node, name: str) -> bool:
    scope = scope_of(node)
    return scope == name or scope.startswith(name + ".")


def _targets(gm: fx.GraphModule, ctx: PassContext, kind: str, arg: str) -> list[tuple[fx.Node, str | None]]:
    nodes = list(gm.graph.nodes)
    if kind == "penultimate":
        last = [node for node, record in _piece_layers(gm, ctx) if "last" in record.role]
        found = [_float_input(gm, node) for node in last]
        return [(n, None) for n in found if n is not None]
    if kind == "output":
        if ctx.piece:
            return []
        out = next(n for n in nodes if n.op == "output").args[0]
        while isinstance(out, (tuple, list)) and out:
            out = out[0]
        if isinstance(out, dict) and out:
            out = next(iter(out.values()))
        return [(out, None)] if isinstance(out, fx.Node) else []
    if kind == "type":
        matches = [(node, record.name) for node, record in _piece_layers(gm, ctx) if _type_matches(record.op, arg)]
        seen = {node for node, _ in matches}
        for node in nodes:
            if (
                node.op == "call_module"
                and node not in seen
                and not str(node.target).startswith(TAP_PREFIX)
                and type(gm.get_submodule(node.target)).__name__.lower() == arg.lower()
            ):
                matches.append((node, ctx.qualify(str(node.target))))
        return matches
    # module:NAME / input:NAME, with NAME global: find it in this piece
    local = arg
    if ctx.piece:
        if not (arg == ctx.piece or arg.startswith(ctx.piece + ".")):
            return []
        local = arg[len(ctx.piece) + 1 :] if arg != ctx.piece else ""
    calls = [n for n in nodes if n.op == "call_module" and str(n.target) == local]
    if calls:
        node = calls[0]
        if kind == "module":
            return [(node, None)]
        source = _float_input(gm, node)
        return [(source, None)] if source is not None else []
    inside = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr") and _in_scope(n, local)]
    if not inside:
        return []
    if kind == "module":
        return [(inside[-1], None)]
    members = set(inside)
    for arg_node in inside[0].all_input_nodes:
        if arg_node not in members:
            return [(arg_node, None)]
    return []


def insert_taps(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Add a recording Tap next to every node each of the recipe's feature taps matches."""
    modified = False
    existing = {
        (n.args[0], m.name, m.key)
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(m := gm.get_submodule(n.target), Tap)
    }
    counter = sum(1 for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(TAP_PREFIX))
    for name, selector in ctx.recipe.features.taps.items():
        kind, arg = parse_selector(selector)
        targets = _targets(gm, ctx, kind, arg)
        ctx.tap_matches[name] = ctx.tap_matches.get(name, 0) + len(targets)
        for node, key in targets:
            if (node, name, key) in existing:
                continue
            attr = f"{TAP_PREFIX}{counter}"
            counter += 1
            gm.add_submodule(attr, Tap(ctx.tap_store, name, key))
            with gm.graph.inserting_after(node):
                gm.graph.call_module(attr, (node,))
            modified = True
    if modified:
        gm.recompile()
    return PassResult(gm, modified)


def insert_perturbations(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Insert FPQ's feature perturbation on the quantized input of every op of the recipe's perturbed type."""
    if ctx.recipe.features.perturb is None:
        return PassResult(gm, False)
    modified = False
    p, op_type = ctx.recipe.features.perturb
    counter = sum(1 for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(PERTURB_PREFIX))
    for node, record in _piece_layers(gm, ctx):
        if not _type_matches(record.op, op_type):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or not is_quantizer_node(gm, source):
            continue  # already perturbed, or an input left in float
        attr = f"{PERTURB_PREFIX}{counter}"
        counter += 1
        gm.add_submodule(attr, FeaturePerturbation(p, gm.get_submodule(source.target)))
        with gm.graph.inserting_after(source):
            perturbed = gm.graph.call_module(attr, (source,))
        node.replace_input_with(source, perturbed)
        modified = True
        ctx.tap_matches["perturbations"] = ctx.tap_matches.get("perturbations", 0) + 1
    if modified:
        gm.recompile()
    return PassResult(gm, modified)
