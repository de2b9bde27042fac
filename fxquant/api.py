"""The public entry point: ``prepare_qat`` and the model it returns."""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxquant.errors import PrepareError, RecipeError, TraceError
from fxquant.passes import PREPARE_PASSES, LayerRecord, PassContext, PassRecord, run_passes, trace_model
from fxquant.quantizers import FakeQuantizer
from fxquant.recipe import Recipe, load_recipe
from fxquant.taps import TapStore


@dataclass
class PrepareReport:
    """What prepare_qat did: traced pieces, opaque modules and why, quantized layers, passes run."""

    pieces: list[str]
    opaque: dict[str, str]
    layers: list[LayerRecord]
    passes: list[PassRecord]
    notes: list[str] = field(default_factory=list)
    costs: dict[str, Any] | None = None  # layer name -> fxquant.cost.LayerCost, when example inputs were given


class QATModel(nn.Module):
    """A model prepared for quantization-aware training. Call it like the original model.

    Attributes: ``model`` (the rewritten model), ``recipe``, ``report``. ``graph_module`` is the traced root
    (None when the model's own forward could not be traced and only its children were).
    """

    def __init__(
        self, model: nn.Module, recipe: Recipe, report: PrepareReport, prepare_options: dict[str, Any] | None = None
    ):
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.report = report
        # How prepare_qat was called besides the recipe (leaf module paths, concrete_args), for fxquant.load.
        self.prepare_options = prepare_options or {}
        self.taps = TapStore()  # replaced by prepare_qat with the store its taps record into
        # Plain attributes, not submodules: the teacher's weights must not reach state_dict, the optimizer
        # or DistributedDataParallel.
        self.__dict__["teacher"] = None
        self.__dict__["losses"] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @property
    def graph_module(self) -> fx.GraphModule | None:
        return self.model if isinstance(self.model, fx.GraphModule) else None

    def graph_modules(self) -> dict[str, fx.GraphModule]:
        """Every traced piece by module path ("" is the root)."""
        return {
            path: getattr(self.model.get_submodule(path), _GRAPH_ATTR) if path else self.model
            for path in self.report.pieces
        }

    def quantizers(self) -> dict[str, FakeQuantizer]:
        """Every quantizer of the model by module path."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, FakeQuantizer)}

    def layer_quantizers(self, layer: LayerRecord) -> tuple[FakeQuantizer | None, list[FakeQuantizer]]:
        """(weight quantizer, activation quantizers) of one quantized layer."""
        piece = self.graph_modules()[layer.piece]
        weight = piece.get_submodule(layer.weight_quantizer) if layer.weight_quantizer else None
        return weight, [piece.get_submodule(p) for p in layer.activation_quantizers]


@contextlib.contextmanager
def disable_quant(model: nn.Module) -> Iterator[nn.Module]:
    """Turn every quantizer of ``model`` off inside the block (the model computes in float), then restore.

    Example usage::

        with fxquant.disable_quant(qmodel):
            float_out = qmodel(x)
    """
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
    states = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield model
    finally:
        for q, state in zip(quantizers, states):
            q.enabled = state


def _as_args(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _ends(pieces: dict[str, fx.GraphModule], order: list[str]) -> dict[str, tuple[bool, bool]]:
    """Where first/last-layer rules apply: in the root graph when it holds quantized ops; otherwise the
    first piece (in module order) holds the first layer and the pieces under the same parent as the last
    piece hold the last layers."""
    from fxquant.passes.annotate import quantizable_nodes

    main = [p for p in sorted(pieces, key=order.index) if quantizable_nodes(pieces[p])]
    if "" in main:
        return {p: (p == "", p == "") for p in pieces}
    if not main:
        return {p: (False, False) for p in pieces}
    last_parent = main[-1].rpartition(".")[0]
    return {p: (p == main[0], p in main and p.rpartition(".")[0] == last_parent) for p in pieces}


_GRAPH_ATTR = "_fxquant_graph"


def _graft(original: nn.Module, gm: fx.GraphModule) -> None:
    """Make ``original`` run the prepared graph ``gm`` while staying an instance of its own class.

    Replacing a submodule by a GraphModule would lose the methods its parent may call on it (RetinaNet
    calls ``head.compute_loss``). Instead, every module and attribute the graph reads is registered on
    ``original`` at the same path (quantized layers, new quantizers), and the generated forward is bound to
    ``original``. The graph module stays reachable for inspection, outside the module tree.
    """
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        *parents, name = str(node.target).split(".")
        owner, source = original, gm
        for part in parents:
            owner, source = getattr(owner, part), getattr(source, part)
        value = getattr(source, name)
        if getattr(owner, name, None) is not value:
            setattr(owner, name, value)
    original.forward = types.MethodType(type(gm).forward, original)
    object.__setattr__(original, _GRAPH_ATTR, gm)  # not a child: no duplicate state_dict keys


def prepare_qat(
    model: nn.Module,
    recipe: str | Path | Recipe | dict[str, Any] = "lsq_w8a8",
    example_inputs: Any = None,
    *,
    leaf_modules: Sequence[str | type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    teacher: nn.Module | bool | None = None,
    **overrides: Any,
) -> QATModel:
    """Trace ``model``, insert fake quantizers as ``recipe`` says, and return a QATModel.

    ``recipe`` is a built-in name, a TOML path, a dict or a Recipe; ``overrides`` are recipe tables merged on
    top (``quant={"weight": {"bits": 3}}``). ``example_inputs`` (a tuple of forward's positional arguments, or
    one tensor) are checked against the model and give the summary its shapes and BOPs. ``leaf_modules``
    (paths or types) stay whole and in float. The input model is not modified.

    The recipe's ``[taps]`` and ``[[loss]]`` tables add feature taps (``qmodel.taps``), FPQ's perturbation
    nodes and the loss objects the training step runs (``qmodel.losses``). Losses that distil from the FP
    model get ``qmodel.teacher``: ``teacher`` (a float model) prepared with the same taps and its quantizers
    off, by default the input ``model`` itself; ``teacher=False`` refuses one (then such a recipe is an error).

    Example usage::

        qmodel = fxquant.prepare_qat(torchvision.models.resnet18(), "lsq_w4a4", torch.randn(1, 3, 224, 224))
        loss = qmodel(x).logsumexp(1).mean(); loss.backward()
    """
    from fxquant.losses import build_losses, feature_plan

    recipe = load_recipe(recipe, overrides or None)
    selectors, perturb = feature_plan(recipe)
    losses = build_losses(recipe)
    fp_needed = [loss.name for loss in losses if loss.teacher_kind == "fp"]
    coreset_table = recipe.data.get("data", {}).get("coreset")
    if coreset_table and "ds" in coreset_table.get("scores", ["evs", "ds"]):
        fp_needed.append("the coreset's disagreement score")
    if "zeroshot" in recipe.data:
        fp_needed.append("zero-shot quantization")
    if fp_needed and teacher is False:
        raise RecipeError(
            recipe.source, "loss", f"{', '.join(fp_needed)} need the FP model, but teacher=False was given"
        )
    qmodel = _prepare(model, recipe, example_inputs, leaf_modules, concrete_args, selectors, perturb)
    qmodel.__dict__["losses"] = losses
    plan_file = recipe.data.get("bits", {}).get("plan")
    if plan_file:
        from fxquant.search import apply, load_plan

        base = Path(recipe.source.split(" (")[0]).parent if recipe.source.endswith(".toml") else Path.cwd()
        path = Path(plan_file) if Path(plan_file).is_absolute() else base / plan_file
        apply(qmodel, load_plan(path))
    if fp_needed:
        source = model if teacher is None or teacher is True else teacher
        fp = _prepare(source, recipe, None, leaf_modules, concrete_args, selectors, None)
        for q in fp.quantizers().values():
            q.enabled = False
        fp.eval()
        for p in fp.parameters():
            p.requires_grad_(False)
        qmodel.__dict__["teacher"] = fp
    return qmodel


def _prepare(
    model: nn.Module,
    recipe: Recipe,
    example_inputs: Any,
    leaf_modules: Sequence[str | type[nn.Module]],
    concrete_args: dict[str, Any] | None,
    selectors: dict[str, str],
    perturb: tuple[float, str] | None,
) -> QATModel:
    args = _as_args(example_inputs)
    model = copy.deepcopy(model)
    mode = model.training
    model.train()  # QAT: trace the training-mode forward
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
        model.train()

    traced = trace_model(model, (*recipe.quant.leaf_modules, *leaf_modules), concrete_args)
    from fxquant.passes.annotate import quantizable_nodes

    if not any(quantizable_nodes(gm) for gm in traced.pieces.values()):
        if traced.first_failure is not None:
            path, err = traced.first_failure
            raise TraceError(path, err) from err
        raise PrepareError(f"{type(model).__name__} has no layer fxquant can quantize (conv, linear, matmul)")

    order = [name for name, _ in model.named_modules()]
    ends = _ends(traced.pieces, order)
    ctx = PassContext(recipe=recipe, keep_float=frozenset(traced.user_leaves), tap_selectors=selectors)
    if perturb is not None:
        ctx.perturb_p, ctx.perturb_type = perturb
    prepared: dict[str, fx.GraphModule] = {}
    for path in sorted(traced.pieces, key=order.index):
        ctx.piece = path
        ctx.resolve_first, ctx.resolve_last = ends[path]
        prepared[path] = run_passes(traced.pieces[path], PREPARE_PASSES, ctx)

    unmatched = [r for r in recipe.quant.rules if r.index not in ctx.matched_rules]
    if unmatched:
        names = sorted({f"{r.name} ({r.op})" for r in ctx.layers.values()})
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise RecipeError(recipe.source, f"{unmatched[0].key_path}.match", f"matches no layer; layers: {shown}")

    empty = [name for name in selectors if not ctx.tap_matches.get(name)]
    if empty:
        names = sorted({f"{r.name} ({r.op})" for r in ctx.layers.values()})[:30]
        key = f"taps.{empty[0]}" if empty[0] in recipe.taps else "loss"
        raise RecipeError(
            recipe.source,
            key,
            f"tap selector {selectors[empty[0]]!r} matches nothing in this model; quantized layers: {', '.join(names)}",
        )

    root = prepared.pop("", model)
    for path, gm in prepared.items():
        _graft(model.get_submodule(path), gm)
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
    qmodel = QATModel(root, recipe, report, {"leaf_modules": leaf_paths, "concrete_args": dict(concrete_args or {})})
    qmodel.taps = ctx.tap_store
    if args is not None:
        from fxquant.cost import measure

        report.costs = measure(qmodel, args)
    qmodel.train(mode)
    return qmodel
