"""The exact allocation: one width per layer (or tied group) minimising Σ Ω under a budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fxquant.errors import FxQuantError


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
