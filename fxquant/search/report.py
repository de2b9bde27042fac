"""What a search shows: a rich table of the allocation and a PNG bar plot of the sensitivities."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torchvision.utils import save_image

from .budget import Budget, LayerInfo, total_cost


def report(layers: Sequence[LayerInfo], budget: Budget, plan: dict[str, tuple[int, int]], method: str, console=None):
    """A rich table: per layer sensitivity, chosen bits, cost; totals against the budget."""
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
    colours = {2: (0.85, 0.2, 0.2), 3: (0.95, 0.55, 0.1), 4: (0.95, 0.85, 0.2), 8: (0.2, 0.7, 0.3)}
    values = torch.tensor([max(layer.sensitivity, 0.0) for layer in layers], dtype=torch.float64, device="cpu")
    scaled = torch.log1p(values / (values.median() + 1e-12))
    scaled = scaled / (scaled.max() + 1e-12)
    image = torch.ones(3, height, len(layers) * (bar + 2) + 2, device="cpu")  # a PNG
    for i, (layer, v) in enumerate(zip(layers, scaled.tolist())):
        top = height - 1 - max(1, int(v * (height - 4)))
        colour = torch.tensor(colours.get(layer.bits, (0.2, 0.4, 0.85)), device="cpu")[:, None, None]
        image[:, top : height - 1, 2 + i * (bar + 2) : 2 + i * (bar + 2) + bar] = colour
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)
    return path
