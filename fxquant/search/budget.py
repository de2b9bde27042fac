"""What a bit search trades: each quantized layer's cost (MACs, parameters) and the budget it must fit.

Budgets (:func:`parse_budget`): ``0.25xW8A8``, ``0.5xFP32``, ``avg3`` (the BOPs of the uniform 3-bit recipe:
3 bits except the fixed first/last layers, so a searched plan is compared with ``lsq_w3a3`` at equal BOPs),
``1.2e9`` (absolute BOPs), ``size:150kB`` (weight bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxquant.config.sections import BUDGET_AVERAGE, BUDGET_RATIO, BUDGET_SIZE, budget_problem
from fxquant.errors import FxQuantError, closest
from fxquant.qat_model import QATModel

from .cost import measure


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
    # the input activation quantizers this layer owns for the search (a quantizer read by several layers is
    # owned by the first), and their sensitivity (one per quantizer)
    activations: tuple[nn.Module, ...] = ()
    activation_sensitivity: tuple[float, ...] = ()

    def bops(self, bits: int) -> int:
        return self.macs * bits * bits


@dataclass(frozen=True)
class Budget:
    kind: str  # "bops" or "size"
    limit: float
    text: str

    def cost(self, layer: LayerInfo, bits: int) -> float:
        return layer.bops(bits) if self.kind == "bops" else layer.params * bits / 8


def layer_table(qmodel: QATModel, example_inputs: Any = None) -> list[LayerInfo]:
    """Every quantized layer with its MACs per sample, weight and parameter count (needs costs: prepare with
    example inputs, or pass them here).

    Example usage::

        layers = fxquant.search.layer_table(qmodel, torch.randn(1, 1, 28, 28))
    """
    costs = qmodel.report.costs
    if costs is None:
        if example_inputs is None:
            raise FxQuantError("bit search needs layer shapes: pass example_inputs (or prepare_qat with them)")
        costs = measure(qmodel, example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
        qmodel.report.costs = costs
    quant = qmodel.recipe.quant
    layers = []
    owned: set[int] = set()
    for record in qmodel.report.layers:
        owner = _weight_owner(qmodel, record)
        weight = getattr(owner, "weight", None) if owner is not None else None
        params = weight.numel() if isinstance(weight, torch.Tensor) else 0
        fixed = None
        if "first" in record.role and quant.first_layer:
            fixed = quant.first_layer.weight_bits
        if "last" in record.role and quant.last_layer:
            fixed = quant.last_layer.weight_bits
        cost = costs.get(record.name)
        activations = tuple(q for q in qmodel.layer_quantizers(record)[1] if id(q) not in owned)
        owned.update(id(q) for q in activations)
        info = LayerInfo(record.name, cost.macs if cost else 0, params, weight, fixed, activations=activations)
        layers.append(info)
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


_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_budget(text: str, layers: Sequence[LayerInfo]) -> Budget:
    """A budget from its text form (see the module docstring); the forms are checked when a recipe loads.

    Example usage::

        parse_budget("0.25xW8A8", layers)      # Budget("bops", 0.25 · Σ MACs·64)
    """
    problem = budget_problem(text)
    if problem:
        raise FxQuantError(problem)
    macs = sum(layer.macs for layer in layers)
    spec = text.strip().replace(" ", "")
    ratio = BUDGET_RATIO.fullmatch(spec)
    if ratio:
        factor = float(ratio.group(1))
        reference = 32 * 32 if ratio.group(2).upper() == "FP32" else int(ratio.group(3)) * int(ratio.group(4))
        return Budget("bops", factor * macs * reference, text)
    average = BUDGET_AVERAGE.fullmatch(spec)
    if average:  # the BOPs of the uniform recipe: b bits everywhere except fixed (first/last) layers
        b = float(average.group(1))
        return Budget("bops", sum(layer.macs * (layer.fixed_bits or b) ** 2 for layer in layers), text)
    size = BUDGET_SIZE.fullmatch(spec)
    if size:
        return Budget("size", float(size.group(1)) * _SIZE_UNITS[size.group(2).lower()], text)
    return Budget("bops", float(spec), text)


def total_cost(layers: Sequence[LayerInfo], plan: dict[str, tuple[int, int]], budget: Budget) -> float:
    """The budget's measure (BOPs or bytes) of a plan."""
    return sum(budget.cost(layer, plan[layer.name][0]) for layer in layers if layer.name in plan)
