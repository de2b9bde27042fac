"""Bit-plan files: per-layer widths as TOML, written by ``fxquant search`` and read by recipes' ``[bits] plan``.

A plan file holds one ``[plan]`` table of ``"layer.name" = { weight = 3, activation = 3 }`` (either width may be
left out: that width then stays as the recipe says).

Example usage::

    save_plan({"layer1.0.conv1": (3, 3)}, "plan.toml")
    load_plan("plan.toml")        # {"layer1.0.conv1": (3, 3)}
"""

from __future__ import annotations

from pathlib import Path

from fxquant.errors import closest

from .fields import Where, parse
from .files import read_toml
from .quoting import quote_key
from .sections import LayerWidths

BitPlan = dict[str, tuple[int | None, int | None]]


def save_plan(plan: BitPlan, path: str | Path, comment: str = "") -> Path:
    """Write a bit plan as TOML (see the module docstring); returns the path."""
    lines = [f"# {line}" for line in comment.splitlines()] + ["[plan]"]
    for name, (w, a) in plan.items():
        widths = ", ".join(f"{k} = {v}" for k, v in (("weight", w), ("activation", a)) if v is not None)
        lines.append(f"{quote_key(name)} = {{ {widths} }}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_plan(path: str | Path, declared_at: Where | None = None) -> BitPlan:
    """Read and validate a plan file; every problem is a RecipeError naming the file and the key (a missing or
    unreadable file is blamed on ``declared_at``, the recipe key that named it, when given).

    Example usage::

        load_plan("plan.toml")        # {"layer1.0.conv1": (3, 3)}
    """
    path = Path(path)
    where = Where(str(path))
    data = read_toml(path, declared_at or where)
    table = data.get("plan")
    if not isinstance(table, dict):
        raise where.key("plan").error('a bit plan needs a [plan] table of "layer" = { weight = b, activation = b }')
    unknown = sorted(set(data) - {"plan"})
    if unknown:
        raise where.key(unknown[0]).error(
            "unknown key; a plan file holds one [plan] table", closest(unknown[0], ["plan"])
        )
    plan: BitPlan = {}
    for name, entry in table.items():
        widths = parse(LayerWidths, entry, where.key("plan").key(name))
        plan[name] = (widths.weight, widths.activation)
    return plan
