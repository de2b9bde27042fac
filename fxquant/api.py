"""The public entry point: ``prepare_qat`` maps a model and a recipe to a :class:`~fxquant.QATModel`.

It prepares and nothing else: teachers and losses are the training side's (:mod:`fxquant.train`), a bit search
is :mod:`fxquant.search`'s.
"""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from fxquant.config import Recipe, load_recipe
from fxquant.config.quoting import quote_key
from fxquant.errors import FxQuantError, PrepareError, RecipeError, TraceError, closest
from fxquant.passes import ORDER_RULES, PREPARE_PASSES, PassContext, run_passes, swap_modules, trace_model
from fxquant.passes.annotate import quantizable_nodes
from fxquant.qat_model import PrepareOptions, PrepareReport, QATModel, graft
from fxquant.quant.attention import TraceableAttention
from fxquant.quant.layers import is_quantizable_module
from fxquant.search.cost import as_args, measure
from fxquant.train.devices import DeviceError, model_device, to_device


def _ends(pieces: dict[str, fx.GraphModule], order: list[str]) -> dict[str, tuple[bool, bool]]:
    """Where first/last-layer rules apply: in the root graph when it holds quantized ops; otherwise the
    first piece (in module order) holds the first layer and the pieces under the same parent as the last
    piece hold the last layers."""
    main = [p for p in sorted(pieces, key=order.index) if quantizable_nodes(pieces[p])]
    if "" in main:
        return {p: (p == "", p == "") for p in pieces}
    if not main:
        return {p: (False, False) for p in pieces}
    last_parent = main[-1].rpartition(".")[0]
    return {p: (p == main[0], p in main and p.rpartition(".")[0] == last_parent) for p in pieces}


def prepare_qat(
    model: nn.Module,
    recipe: str | os.PathLike | Recipe | dict[str, Any] = "lsq_w8a8",
    example_inputs: Any = None,
    *,
    leaf_modules: Sequence[str | type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    float_model: nn.Module | bool | None = None,
    **overrides: Any,
) -> QATModel:
    """Trace ``model``, insert fake quantizers, taps and perturbations as ``recipe`` says, and return a QATModel.

    ``recipe`` is a built-in name, a TOML path, a dict or a Recipe; ``overrides`` are recipe tables merged on
    top (``quant={"weight": {"bits": 3}}``). ``example_inputs`` (a tuple of forward's positional arguments, or
    one tensor) are checked against the model and give the summary its shapes and BOPs. ``leaf_modules``
    (paths or types) stay whole and in float. The input model is not modified. A ``[bits]`` plan in the recipe
    sets per-layer widths.

    ``float_model``: what ``qmodel.float_model`` refers to, which the training side distils from (teachers,
    coreset scores, zero-shot). By default a frozen copy of ``model`` when the recipe reads the float model
    (``recipe.float_model_uses()``), else none; a module to use that one; ``False`` for none (then give
    ``TrainStep(..., teacher=...)`` one yourself).

    Example usage::

        qmodel = fxquant.prepare_qat(torchvision.models.resnet18(), "lsq_w4a4", torch.randn(1, 3, 224, 224))
        loss = qmodel(x).logsumexp(1).mean(); loss.backward()
    """
    recipe = load_recipe(recipe, overrides or None)
    try:
        qmodel = _prepare(model, recipe, example_inputs, leaf_modules, concrete_args)
    except FxQuantError:
        raise
    except Exception as err:  # a defect or a model fxquant cannot handle: still an fxquant error, cause kept
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise PrepareError(f"prepare_qat failed on {type(model).__name__}: {type(err).__name__}: {first}") from err
    if isinstance(float_model, nn.Module):
        qmodel.keep_float_model(float_model)
    elif float_model is None and recipe.float_model_uses():
        qmodel.keep_float_model(_frozen_copy(model))
    return qmodel


def _copy(model: nn.Module) -> nn.Module:
    """prepare_qat never modifies the caller's model: it works on a deep copy."""
    try:
        return copy.deepcopy(model)
    except Exception as err:
        raise PrepareError(
            f"cannot copy {type(model).__name__} ({type(err).__name__}: {err}); prepare_qat works on a copy, so "
            "every attribute of the model must be copyable (move locks, open files and the like out of the module)"
        ) from err


def _frozen_copy(model: nn.Module) -> nn.Module:
    frozen = _copy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def _prepare(
    model: nn.Module,
    recipe: Recipe,
    example_inputs: Any,
    leaf_modules: Sequence[str | type[nn.Module]],
    concrete_args: dict[str, Any] | None,
) -> QATModel:
    args = as_args(example_inputs)
    _check_leaf_modules(model, recipe, leaf_modules)
    model = _copy(model)
    device = _device_of(model)
    if device is not None and args is not None:  # example inputs may be given on the CPU for a model on a GPU
        args = to_device(args, device)
    user_leaves = (*recipe.quant.leaf_modules, *leaf_modules)
    swaps = swap_modules(
        model,
        frozenset(m for m in user_leaves if isinstance(m, str)),
        tuple(m for m in user_leaves if isinstance(m, type)),
    )
    model = swaps.model
    mode = model.training
    if args is not None:
        model.eval()
        try:
            with torch.no_grad():
                model(*args)
        except Exception as err:
            raise PrepareError(
                f"example_inputs do not fit the original model ({type(err).__name__}: {err}); pass a tuple "
                "of forward's positional arguments, or a single tensor"
            ) from err
    model.train()  # QAT: trace the training-mode forward
    # Tensors keep their identity through the passes (quantized layers share the float parameters), which is
    # how float state_dict keys are mapped to the prepared model's.
    float_keys = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}

    traced = trace_model(model, user_leaves, concrete_args)
    if not any(quantizable_nodes(gm) for gm in traced.pieces.values()):
        if traced.first_failure is not None:
            path, err = traced.first_failure
            raise TraceError(path, err) from err
        raise PrepareError(f"{type(model).__name__} has no layer fxquant can quantize (conv, linear, matmul)")

    order = [name for name, _ in model.named_modules()]
    ends = _ends(traced.pieces, order)
    ctx = PassContext(recipe=recipe, keep_float=frozenset(traced.user_leaves), attention_scopes=swaps.scopes)
    prepared: dict[str, fx.GraphModule] = {}
    for path in sorted(traced.pieces, key=order.index):
        ctx.piece = path
        ctx.resolve_first, ctx.resolve_last = ends[path]
        prepared[path] = run_passes(traced.pieces[path], PREPARE_PASSES, ctx, ORDER_RULES)
    _check_recipe_fits(recipe, ctx)

    quantized = {r.name for r in ctx.layers.values()}
    float_layers = _float_layers(model, quantized, traced.opaque)
    float_layers.update({path: why for path, why in swaps.kept.items() if path in float_layers})
    root = prepared.pop("", model)
    for path, gm in prepared.items():
        graft(model.get_submodule(path), gm)
    report = PrepareReport(
        pieces=sorted(traced.pieces, key=order.index),
        opaque=traced.opaque,
        layers=list(ctx.layers.values()),
        passes=ctx.records,
        notes=ctx.notes,
        float_layers=float_layers,
        swapped={
            **swaps.swapped,
            **_swapped_layers(model, traced.pieces, traced.opaque, quantized),
        },
    )
    leaf_paths = sorted(
        {m for m in leaf_modules if isinstance(m, str)}
        | {
            name
            for name, m in model.named_modules()
            if any(isinstance(m, t) for t in leaf_modules if isinstance(t, type))
        }
    )
    options = PrepareOptions(tuple(leaf_paths), types.MappingProxyType(dict(concrete_args or {})))
    prepared_keys = {id(t): f"model.{k}" for k, t in root.state_dict(keep_vars=True).items()}
    key_map = {key: prepared_keys[i] for i, key in float_keys.items() if i in prepared_keys}
    qmodel = QATModel(root, recipe, report, ctx.tap_store, options, key_map)
    if device is not None:  # the quantizers and taps the passes added join the model where it is
        qmodel.to(device)
    if args is not None:
        report.costs = measure(qmodel, args)
    qmodel.train(mode)
    return qmodel


def _device_of(model: nn.Module) -> torch.device | None:
    """The one device the model is on, or None for a model split across devices (left as the user placed it)."""
    try:
        return model_device(model)
    except DeviceError:
        return None


# Layers with weights fxquant has no quantized form for (yet): they run in float and the report says so.
_UNSUPPORTED = (nn.RNNBase, nn.MultiheadAttention, nn.EmbeddingBag, nn.Bilinear)


def _float_layers(model: nn.Module, quantized: set[str], opaque: dict[str, str]) -> dict[str, str]:
    """Every conv/linear not quantized and every layer of an unsupported type, with the reason (the nearest
    opaque module's, or the type's); a float module's own children are not listed again."""
    found: dict[str, str] = {}
    for path, module in model.named_modules():
        if not path or path in quantized or any(path.startswith(f"{f}.") for f in found):
            continue
        if not (is_quantizable_module(module) or isinstance(module, _UNSUPPORTED)):
            continue
        if isinstance(module, TraceableAttention):  # its projections are listed on their own
            continue
        holder = next((p for p in _ancestors(path) if p in opaque), None)
        if isinstance(module, nn.Embedding):
            found[path] = "embeddings stay float unless a [[quant.rule]] selects them (weight-only)"
        elif holder == path:
            found[path] = opaque[path]
        elif holder is not None:
            found[path] = f"inside {holder or '<root>'}: {opaque[holder]}"
        elif isinstance(module, _UNSUPPORTED):
            found[path] = f"fxquant has no quantized {type(module).__name__}; it runs in float"
        else:
            found[path] = "not called as a layer by the traced graph (its weights are used directly), kept float"
    return found


def _swapped_layers(
    model: nn.Module, pieces: dict[str, fx.GraphModule], opaque: dict[str, str], quantized: set[str]
) -> dict[str, str]:
    """Layers quantized on their own because the code around them cannot be traced: the layer is swapped for its
    quantized form (weight quantizer, input quantizer) while the opaque forward around it runs as written."""
    found = {}
    for path in pieces:
        if not path or path not in quantized or not is_quantizable_module(model.get_submodule(path)):
            continue
        holder = next((p for p in _ancestors(path)[1:] if p in opaque), None)
        if holder is not None:
            found[path] = f"quantized by module swap: inside {holder or '<root>'}, {opaque[holder]}"
    return found


def _ancestors(path: str) -> list[str]:
    """``a.b.c`` → [``a.b.c``, ``a.b``, ``a``, ````] (nearest first)."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _check_recipe_fits(recipe: Recipe, ctx: PassContext) -> None:
    """Rules, taps and plan entries that match nothing in this model are recipe errors."""
    names = sorted({f"{r.name} ({r.op})" for r in ctx.layers.values()})
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    unmatched = [r for r in recipe.quant.rules if r.index not in ctx.matched_rules]
    if unmatched:
        raise RecipeError(recipe.source, f"{unmatched[0].key_path}.match", f"matches no layer; layers: {shown}")
    empty = [name for name in recipe.features.taps if not ctx.tap_matches.get(name)]
    if empty:
        key = recipe.features.declared_by.get(empty[0], f"taps.{empty[0]}")
        written = _value_at(recipe.toml, key)
        raise RecipeError(
            recipe.source,
            key,
            f"selector {written if written is not None else recipe.features.taps[empty[0]]!r} matches nothing "
            f"in this model; quantized layers: {shown}",
        )
    if recipe.bit_plan is not None:
        names = {r.name for r in ctx.layers.values()}
        unknown = [name for name in recipe.bit_plan if name not in names]
        if unknown:
            # the plan file names the layer (a [bits] plan), or the recipe's own [bits.layers]
            source, key = (recipe.bits.plan, "plan") if recipe.bits.plan else (recipe.source, "bits.layers")
            raise RecipeError(
                source,
                f"{key}.{quote_key(unknown[0])}",
                f"no layer of that name in this model; layers: {shown}",
                closest(unknown[0], names),
            )


def _value_at(table: Any, key_path: str) -> Any:
    """The value at ``loss[1].layers`` in a raw recipe table, or None."""
    for part in key_path.replace("[", ".[").split("."):
        if part.startswith("[") and isinstance(table, list):
            index = int(part.strip("[]"))
            table = table[index] if index < len(table) else None
        elif isinstance(table, dict):
            table = table.get(part)
        else:
            return None
    return table


def _check_leaf_modules(model: nn.Module, recipe: Recipe, leaf_modules: Sequence[str | type[nn.Module]]) -> None:
    """Leaf module paths must name modules of this model: the recipe's are RecipeErrors at their key."""
    known = [name for name, _ in model.named_modules() if name]
    for i, path in enumerate(recipe.quant.leaf_modules):
        if path not in known:
            raise RecipeError(
                recipe.source,
                f"quant.leaf_modules[{i}]",
                f"{type(model).__name__} has no module {path!r}",
                closest(path, known),
            )
    for path in leaf_modules:
        if not isinstance(path, (str, type)):
            raise PrepareError(f"leaf_modules holds module paths or types, got {type(path).__name__}")
        if isinstance(path, str) and path not in known:
            hint = closest(path, known)
            raise PrepareError(
                f"leaf_modules: {type(model).__name__} has no module {path!r}"
                + (f" (did you mean {hint!r}?)" if hint else "")
            )
