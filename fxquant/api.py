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
from fxquant.errors import PrepareError, RecipeError, TraceError
from fxquant.passes import PREPARE_PASSES, PassContext, run_passes, trace_model
from fxquant.passes.annotate import quantizable_nodes
from fxquant.qat_model import PrepareOptions, PrepareReport, QATModel, graft
from fxquant.quant.controls import check_plan_layers
from fxquant.search.cost import as_args, measure


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
    qmodel = _prepare(model, recipe, example_inputs, leaf_modules, concrete_args)
    if isinstance(float_model, nn.Module):
        qmodel.keep_float_model(float_model)
    elif float_model is None and recipe.float_model_uses():
        qmodel.keep_float_model(_frozen_copy(model))
    return qmodel


def _frozen_copy(model: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(model).eval()
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
    model = copy.deepcopy(model)
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

    traced = trace_model(model, (*recipe.quant.leaf_modules, *leaf_modules), concrete_args)
    if not any(quantizable_nodes(gm) for gm in traced.pieces.values()):
        if traced.first_failure is not None:
            path, err = traced.first_failure
            raise TraceError(path, err) from err
        raise PrepareError(f"{type(model).__name__} has no layer fxquant can quantize (conv, linear, matmul)")

    order = [name for name, _ in model.named_modules()]
    ends = _ends(traced.pieces, order)
    ctx = PassContext(recipe=recipe, keep_float=frozenset(traced.user_leaves))
    prepared: dict[str, fx.GraphModule] = {}
    for path in sorted(traced.pieces, key=order.index):
        ctx.piece = path
        ctx.resolve_first, ctx.resolve_last = ends[path]
        prepared[path] = run_passes(traced.pieces[path], PREPARE_PASSES, ctx)
    _check_recipe_fits(recipe, ctx)

    root = prepared.pop("", model)
    for path, gm in prepared.items():
        graft(model.get_submodule(path), gm)
    report = PrepareReport(
        pieces=sorted(traced.pieces, key=order.index),
        opaque=traced.opaque,
        layers=list(ctx.layers.values()),
        passes=ctx.records,
        notes=ctx.notes,
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
    if args is not None:
        report.costs = measure(qmodel, args)
    qmodel.train(mode)
    return qmodel


def _check_recipe_fits(recipe: Recipe, ctx: PassContext) -> None:
    """Rules, taps and plan entries that match nothing in this model are recipe errors."""
    names = sorted({f"{r.name} ({r.op})" for r in ctx.layers.values()})
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    unmatched = [r for r in recipe.quant.rules if r.index not in ctx.matched_rules]
    if unmatched:
        raise RecipeError(recipe.source, f"{unmatched[0].key_path}.match", f"matches no layer; layers: {shown}")
    empty = [name for name in recipe.features.taps if not ctx.tap_matches.get(name)]
    if empty:
        selector = recipe.features.taps[empty[0]]
        raise RecipeError(
            recipe.source,
            recipe.features.declared_by.get(empty[0], "taps"),
            f"tap selector {selector!r} matches nothing in this model; quantized layers: {shown}",
        )
    if recipe.bit_plan is not None:
        try:
            check_plan_layers(recipe.bit_plan, {r.name for r in ctx.layers.values()})
        except Exception as err:
            raise RecipeError(recipe.bits.plan or recipe.source, "bits", str(err)) from None
