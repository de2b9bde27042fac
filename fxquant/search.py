"""Sharpness-driven per-layer bit widths: sensitivity → exact allocation under a budget → a bit plan.

1. **Cost** (:func:`layer_table`): per quantized layer, MACs per sample from example inputs (``fxquant.cost``),
   BOPs(b_w, b_a) = MACs·b_w·b_a, weight bytes = params·b_w/8. Budgets (:func:`parse_budget`): ``0.25xW8A8``,
   ``0.5xFP32``, ``avg3`` (the BOPs of the uniform 3-bit recipe: 3 bits except the fixed first/last layers, so
   a searched plan is compared with ``lsq_w3a3`` at equal BOPs), ``1.2e9`` (absolute BOPs), ``size:150kB``.
2. **Sensitivity** on calibration batches, with the quantizers off (the sharpness of the float loss):
   :func:`hutchinson_traces` — Tr(H_i) of each layer's weight block by Hutchinson's estimator (Rademacher v,
   one Hessian-vector product per iteration for all layers; cross-layer terms vanish in expectation), until
   every layer's running mean moves less than ``tol`` (relative) — never stopping while a mean is negative;
   :func:`sam_increases` — L(w + ρ·g_i/‖g_i‖) − L(w), the loss increase of a SAM step restricted to layer i.
3. **Perturbation term** Ω_i(b) = S_i/n_i·‖Q_b(w_i) − w_i‖² with Q_b the per-channel LSQ-initialised grid.
4. **Allocation** (:func:`allocate`): minimise Σ Ω_i(b_i) subject to Σ cost_i(b_i) ≤ budget, one width per layer
   (or per tied group: the user's ties plus layers reading one activation quantizer, which must share its
   width), fixed widths for the recipe's first/last layers; solved exactly by dynamic programming over Pareto
   frontiers (cost, Ω) — no discretisation of the budget.
5. **Plan**: ``{layer: (weight_bits, activation_bits)}``, saved as TOML (:func:`save_plan`), applied to a prepared
   model without re-tracing (:func:`apply`) or from a recipe's ``[bits] plan = "file.toml"``.

Example usage::

    plan, table = fxquant.search.search(qmodel, batches, budget="0.25xW8A8", method="hessian")
    fxquant.search.apply(qmodel, plan)
"""

from __future__ import annotations

import contextlib
import math
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.errors import FxQuantError, closest
from fxquant.fake_quant import fake_quantize
from fxquant.passes.assign_bits import check_plan_layers
from fxquant.quantizers import integer_range

DEFAULT_CANDIDATES = (2, 3, 4, 8)


@dataclass
class LayerInfo:
    name: str
    macs: int
    params: int
    weight: nn.Parameter | None
    fixed_bits: int | None = None  # first/last layers: the recipe's width, which budgets count
    searched: bool = True  # False when the layer kept its fixed width
    sensitivity: float = 0.0
    omega: dict[int, float] = field(default_factory=dict)
    bits: int | None = None

    def bops(self, bits: int) -> int:
        return self.macs * bits * bits


@dataclass(frozen=True)
class Budget:
    kind: str  # "bops" or "size"
    limit: float
    text: str

    def cost(self, layer: LayerInfo, bits: int) -> float:
        return layer.bops(bits) if self.kind == "bops" else layer.params * bits / 8


def layer_table(qmodel: nn.Module, example_inputs: Any = None) -> list[LayerInfo]:
    """Every quantized layer with its MACs per sample, weight and parameter count (needs costs: prepare with
    example inputs, or pass them here).

    Example usage::

        layers = fxquant.search.layer_table(qmodel, torch.randn(1, 1, 28, 28))
    """
    from fxquant.cost import measure

    costs = qmodel.report.costs
    if costs is None:
        if example_inputs is None:
            raise FxQuantError("bit search needs layer shapes: pass example_inputs (or prepare_qat with them)")
        costs = measure(qmodel, example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
        qmodel.report.costs = costs
    recipe = qmodel.recipe.quant
    layers = []
    for record in qmodel.report.layers:
        owner = _weight_owner(qmodel, record)
        weight = getattr(owner, "weight", None) if owner is not None else None
        params = weight.numel() if isinstance(weight, torch.Tensor) else 0
        fixed = None
        if "first" in record.role and recipe.first_layer:
            fixed = recipe.first_layer.get("weight_bits")
        if "last" in record.role and recipe.last_layer:
            fixed = recipe.last_layer.get("weight_bits")
        cost = costs.get(record.name)
        layers.append(LayerInfo(record.name, cost.macs if cost else 0, params, weight, fixed))
    return layers


def shared_input_groups(qmodel: nn.Module) -> list[list[str]]:
    """Layers that read the same activation quantizer (e.g. a residual block's first conv and its downsample):
    one quantizer has one width, so with tied weight/activation bits these layers must share a width — else the
    widest would set the shared input's width and the real BOPs would exceed the plan's. One list per shared
    quantizer; :func:`tie_groups` merges lists that overlap."""
    readers: dict[int, dict[str, None]] = {}  # quantizer id → layer names, in order, without repeats
    for record in qmodel.report.layers:
        for q in qmodel.layer_quantizers(record)[1]:
            readers.setdefault(id(q), {})[record.name] = None
    return [list(names) for names in readers.values() if len(names) > 1]


def tie_groups(
    qmodel: nn.Module, layers: Sequence[LayerInfo], tie: Sequence[Sequence[str]] = ()
) -> list[list[LayerInfo]]:
    """Every layer in exactly one group: the user's ties merged with :func:`shared_input_groups`."""
    by_name = {layer.name: layer for layer in layers}
    for names in tie:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise FxQuantError(
                f"tie names unknown layer {unknown[0]!r} (did you mean {closest(unknown[0], by_name)!r}?)"
            )
    parent = {name: name for name in by_name}

    def find(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for names in [*tie, *shared_input_groups(qmodel)]:
        for other in names[1:]:
            parent[find(other)] = find(names[0])
    groups: dict[str, list[LayerInfo]] = {}
    for layer in layers:
        groups.setdefault(find(layer.name), []).append(layer)
    return list(groups.values())


def _weight_owner(qmodel: nn.Module, record) -> nn.Module | None:
    piece = qmodel.graph_modules()[record.piece]
    node = next((n for n in piece.graph.nodes if n.name == record.node), None)
    if node is not None and node.op == "call_module":
        return piece.get_submodule(node.target)
    return None


_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2}


def parse_budget(text: str, layers: Sequence[LayerInfo]) -> Budget:
    """A budget from its text form (see the module docstring).

    Example usage::

        parse_budget("0.25xW8A8", layers)      # Budget("bops", 0.25 · Σ MACs·64)
    """
    macs = sum(layer.macs for layer in layers)
    spec = text.strip().replace(" ", "")
    ratio = re.fullmatch(r"([0-9.eE+-]+)x(W(\d+)A(\d+)|FP32)", spec, flags=re.IGNORECASE)
    if ratio:
        factor = float(ratio.group(1))
        reference = 32 * 32 if ratio.group(2).upper() == "FP32" else int(ratio.group(3)) * int(ratio.group(4))
        return Budget("bops", factor * macs * reference, text)
    average = re.fullmatch(r"avg([0-9.]+)", spec, flags=re.IGNORECASE)
    if average:  # the BOPs of the uniform recipe: b bits everywhere except fixed (first/last) layers
        b = float(average.group(1))
        return Budget("bops", sum(layer.macs * (layer.fixed_bits or b) ** 2 for layer in layers), text)
    size = re.fullmatch(r"size:([0-9.eE+]+)([kKmMgG]?i?[bB])", spec)
    if size:
        return Budget("size", float(size.group(1)) * _SIZE_UNITS[size.group(2).lower()], text)
    try:
        return Budget("bops", float(spec), text)
    except ValueError:
        raise FxQuantError(
            f"budget {text!r} not understood; use e.g. 0.25xW8A8, 0.5xFP32, avg3, 1.2e9 (BOPs) or size:150kB"
        ) from None


# -- sensitivity ------------------------------------------------------------------------------------------
def _loss(model: nn.Module, batches: Iterable) -> torch.Tensor:
    total, count = 0.0, 0
    for x, y in batches:
        total = total + F.cross_entropy(model(x), y, reduction="sum")
        count += len(y)
    return total / max(count, 1)


def hutchinson_traces(
    qmodel: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence,
    tol: float = 0.05,
    max_iterations: int = 50,
    min_iterations: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Tr(H_i) per layer (weights only) by Hutchinson's estimator, quantizers off, eval mode.

    Example usage::

        traces = hutchinson_traces(qmodel, layers, [(x, y)])
    """
    from fxquant.api import disable_quant

    params = [layer.weight for layer in layers if layer.weight is not None]
    names = [layer.name for layer in layers if layer.weight is not None]
    generator = torch.Generator().manual_seed(seed)
    sums = [0.0] * len(params)
    previous: list[float] | None = None
    was_training = qmodel.training
    qmodel.eval()
    bar = _progress() if progress else None
    try:
        with disable_quant(qmodel), bar or contextlib.nullcontext():
            task = bar.add_task("Hessian trace", total=max_iterations) if bar else None
            loss = _loss(qmodel, batches)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for k in range(1, max_iterations + 1):
                vs = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype).mul_(2).sub_(1) for p in params]
                hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                for i, (v, hv) in enumerate(zip(vs, hvs)):
                    sums[i] += float((v * hv).sum())
                means = [s / k for s in sums]
                if bar:
                    bar.update(task, advance=1)
                if previous is not None and k >= min_iterations and all(m >= 0 for m in means):
                    change = max(abs(m - p) / (abs(m) + 1e-12) for m, p in zip(means, previous))
                    if change < tol:
                        break
                previous = means
    finally:
        qmodel.train(was_training)
    return dict(zip(names, [s / k for s in sums]))


def sam_increases(
    qmodel: nn.Module, layers: Sequence[LayerInfo], batches: Sequence, rho: float = 0.05
) -> dict[str, float]:
    """L(w + ρ·g_i/‖g_i‖) − L(w) for each layer i alone (quantizers off, eval mode).

    Example usage::

        increases = sam_increases(qmodel, layers, [(x, y)], rho=0.05)
    """
    from fxquant.api import disable_quant

    result = {}
    was_training = qmodel.training
    qmodel.eval()
    try:
        with disable_quant(qmodel):
            loss = _loss(qmodel, batches)
            params = [layer.weight for layer in layers if layer.weight is not None]
            grads = torch.autograd.grad(loss, params)
            base = float(loss.detach())
            with torch.no_grad():
                for layer, g in zip([lay for lay in layers if lay.weight is not None], grads):
                    eps = rho * g / (g.norm() + 1e-12)
                    layer.weight.add_(eps)
                    result[layer.name] = float(_loss(qmodel, batches)) - base
                    layer.weight.sub_(eps)
    finally:
        qmodel.train(was_training)
    return result


@torch.no_grad()
def quantization_error(weight: torch.Tensor, bits: int) -> float:
    """‖Q_b(w) − w‖² with per-output-channel symmetric steps initialised as LSQ does (2·mean|w|/√Qp)."""
    qmin, qmax = integer_range(bits, True)
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = (2 * flat.abs().mean(1) / math.sqrt(qmax)).clamp(min=1e-8)
    return float((fake_quantize(weight.detach(), scale, None, qmin, qmax, ch_axis=0) - weight).square().sum())


# -- allocation -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    bits: int
    cost: float
    omega: float


def allocate(groups: Sequence[Sequence[Option]], limit: float) -> tuple[list[int], float, float]:
    """Pick one option per group minimising Σ ω subject to Σ cost ≤ limit, exactly.

    Dynamic programming over Pareto frontiers: after each group, keep only (cost, ω) pairs that no other
    pair beats on both. Returns (chosen index per group, total cost, total ω). Raises FxQuantError when even
    the cheapest choice exceeds the limit.

    Example usage::

        choice, cost, omega = allocate([[Option(2, 1, 5.0), Option(4, 2, 1.0)]], limit=1.5)   # ([0], 1, 5.0)
    """
    frontier: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for options in groups:
        expanded = [
            (cost + o.cost, omega + o.omega, (*picks, j))
            for cost, omega, picks in frontier
            for j, o in enumerate(options)
            if cost + o.cost <= limit * (1 + 1e-12)
        ]
        if not expanded:
            cheapest = sum(min(o.cost for o in g) for g in groups)
            raise FxQuantError(f"budget {limit:.4g} is below the cheapest allocation ({cheapest:.4g})")
        expanded.sort(key=lambda t: (t[0], t[1]))
        frontier = []
        best = math.inf
        for item in expanded:
            if item[1] < best:
                frontier.append(item)
                best = item[1]
    cost, omega, picks = min(frontier, key=lambda t: (t[1], t[0]))
    return list(picks), cost, omega


def search(
    qmodel: nn.Module,
    batches: Sequence,
    budget: str,
    method: str = "hessian",
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    example_inputs: Any = None,
    tie: Sequence[Sequence[str]] = (),
    rho: float = 0.05,
    tol: float = 0.05,
    max_iterations: int = 50,
    progress: bool = False,
    iterations: int = 100,
    search_first_last: bool = False,
) -> tuple[dict[str, tuple[int, int]], list[LayerInfo]]:
    """Sensitivity, then the exact allocation; returns (bit plan, per-layer table). Weight and activation bits
    are tied (each layer gets (b, b)). The recipe's first/last widths are kept unless ``search_first_last``, in
    which case they are searched too (an ``avgB`` budget still counts them at the recipe's widths: at ``avg2``
    that is the only way a plan can differ from uniform 2 bits). ``method = "saq"`` learns the configuration
    with SAQ's generator instead (:mod:`fxquant.saq_generator`, ``iterations`` steps).

    Example usage::

        plan, layers = search(qmodel, [(x, y)], "0.25xW8A8", method="sam")
    """
    if method not in ("hessian", "sam", "saq"):
        raise FxQuantError(f"search method must be 'hessian', 'sam' or 'saq', got {method!r}")
    if method == "saq":  # SAQ's learned generator: the last batch is held out
        from fxquant.saq_generator import generate

        if len(batches) < 2:
            raise FxQuantError("the saq method needs at least 2 batches (training and held-out)")
        plan, _ = generate(
            qmodel,
            batches[:-1],
            batches[-1:],
            budget,
            candidates,
            iterations,
            rho=rho,
            example_inputs=example_inputs,
            search_first_last=search_first_last,
        )
        layers = layer_table(qmodel, example_inputs)
        for layer in layers:
            layer.bits = plan[layer.name][0]
            layer.searched = not (layer.fixed_bits and not search_first_last)
        return plan, layers
    layers = layer_table(qmodel, example_inputs)
    limit = parse_budget(budget, layers)
    if method == "hessian":
        scores = hutchinson_traces(qmodel, layers, batches, tol=tol, max_iterations=max_iterations, progress=progress)
    else:
        scores = sam_increases(qmodel, layers, batches, rho)
    for layer in layers:
        layer.sensitivity = scores.get(layer.name, 0.0)
        # the budget still counts a first/last layer at its fixed width; searching it only widens the options
        layer.searched = not (layer.fixed_bits and not search_first_last)
        options = list(candidates) if layer.searched else [layer.fixed_bits]
        n = max(layer.params, 1)
        layer.omega = {
            b: (layer.sensitivity / n * quantization_error(layer.weight, b) if layer.weight is not None else 0.0)
            for b in options
        }
    groups = tie_groups(qmodel, layers, tie)
    option_lists = []
    for members in groups:
        shared = set.intersection(*(set(m.omega) for m in members))
        if not shared:
            raise FxQuantError(f"tied layers {[m.name for m in members]} have no width in common")
        option_lists.append(
            [
                Option(b, sum(limit.cost(m, b) for m in members), sum(m.omega[b] for m in members))
                for b in sorted(shared)
            ]
        )
    picks, _, _ = allocate(option_lists, limit.limit)
    plan = {}
    for members, options, j in zip(groups, option_lists, picks):
        for m in members:
            m.bits = options[j].bits
            plan[m.name] = (options[j].bits, options[j].bits)
    return plan, layers


# -- plans ---------------------------------------------------------------------------------------------
def save_plan(plan: dict[str, tuple[int, int]], path: str | Path, comment: str = "") -> Path:
    """Write a bit plan as TOML: a ``[plan]`` table of ``"layer.name" = { weight = 3, activation = 3 }``."""
    lines = [f"# {line}" for line in comment.splitlines()] + ["[plan]"]
    lines += [f'"{name}" = {{ weight = {w}, activation = {a} }}' for name, (w, a) in plan.items()]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def load_plan(path: str | Path) -> dict[str, tuple[int, int]]:
    """Read a plan written by :func:`save_plan`."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FxQuantError(f"bit plan {path} not found") from None
    table = data.get("plan")
    if not isinstance(table, dict):
        raise FxQuantError(f"{path}: a bit plan needs a [plan] table of layer = {{ weight = b, activation = b }}")
    return {name: (int(v["weight"]), int(v["activation"])) for name, v in table.items()}


def apply(qmodel: nn.Module, plan: dict[str, tuple[int | None, int | None]]) -> None:
    """Set the widths a plan gives, without re-tracing. A shared activation quantizer takes the widest width
    its layers ask for (as the assign_bits pass does).

    Example usage::

        fxquant.search.apply(qmodel, {"layer1.0.conv1": (3, 3)})
    """
    records = {r.name: r for r in qmodel.report.layers}
    check_plan_layers(plan, set(records))
    activation_bits: dict[int, tuple[Any, int]] = {}
    for name, (w_bits, a_bits) in plan.items():
        weight_q, act_qs = qmodel.layer_quantizers(records[name])
        if w_bits is not None and weight_q is not None:
            weight_q.bits = w_bits
        for q in act_qs if a_bits is not None else ():
            current = activation_bits.get(id(q), (q, 0))[1]
            activation_bits[id(q)] = (q, max(current, a_bits))
    for q, bits in activation_bits.values():
        q.bits = bits


def total_cost(layers: Sequence[LayerInfo], plan: dict[str, tuple[int, int]], budget: Budget) -> float:
    """The budget's measure (BOPs or bytes) of a plan."""
    return sum(budget.cost(layer, plan[layer.name][0]) for layer in layers if layer.name in plan)


def report(layers: Sequence[LayerInfo], budget: Budget, plan: dict[str, tuple[int, int]], method: str, console=None):
    """A rich table: per layer sensitivity, chosen bits, cost; totals against the budget."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    unit = "BOPs" if budget.kind == "bops" else "bytes"
    table = Table(title=f"bit allocation · {method} · budget {budget.text} ({budget.limit:.4g} {unit})")
    for column in ("layer", "sensitivity", "bits", f"{unit}", "fixed"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in layers:
        bits = plan.get(layer.name, (layer.bits, layer.bits))[0]
        cost = budget.cost(layer, bits) if bits else 0
        table.add_row(layer.name, f"{layer.sensitivity:.4g}", str(bits), f"{cost:.4g}", "" if layer.searched else "yes")
    used = total_cost(layers, plan, budget)
    table.caption = f"total {used:.4g} {unit} = {100 * used / budget.limit:.1f}% of the budget"
    console.print(table)


def save_bar_plot(layers: Sequence[LayerInfo], path: str | Path, height: int = 160, bar: int = 12) -> Path:
    """A PNG bar plot: one bar per layer, height ∝ log(1 + sensitivity/median), colour by bits
    (2 red, 3 orange, 4 yellow, 8 green, other blue). Written with torchvision (no plotting library)."""
    from torchvision.utils import save_image

    colours = {2: (0.85, 0.2, 0.2), 3: (0.95, 0.55, 0.1), 4: (0.95, 0.85, 0.2), 8: (0.2, 0.7, 0.3)}
    values = torch.tensor([max(layer.sensitivity, 0.0) for layer in layers], dtype=torch.float64)
    scaled = torch.log1p(values / (values.median() + 1e-12))
    scaled = scaled / (scaled.max() + 1e-12)
    image = torch.ones(3, height, len(layers) * (bar + 2) + 2)
    for i, (layer, v) in enumerate(zip(layers, scaled.tolist())):
        top = height - 1 - max(1, int(v * (height - 4)))
        colour = torch.tensor(colours.get(layer.bits, (0.2, 0.4, 0.85)))[:, None, None]
        image[:, top : height - 1, 2 + i * (bar + 2) : 2 + i * (bar + 2) + bar] = colour
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)
    return path


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
