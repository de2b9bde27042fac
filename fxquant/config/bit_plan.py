"""Bit-plan files: per-layer widths as TOML, written by ``fxquant search`` and read by recipes' ``[bits] plan``.

A plan file holds one ``[plan]`` table of ``"layer.name" = { weight = 3, activation = 3 }`` (either width may be
left out: that width then stays as the recipe says).

Example usage::

    save_plan({"layer1.0.conv1": (3, 3)}, "plan.toml")
    load_plan("plan.toml")        # {"layer1.0.conv1": (3, 3)}
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from .fields import Where, parse
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


def load_plan(path: str | Path) -> BitPlan:
    """Read and validate a plan file; every problem is a RecipeError naming the file and the key."""
    path = Path(path)
    where = Where(str(path))
    if not path.is_file():
        raise where.error("bit plan file not found" if not path.exists() else "bit plan path is not a file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise where.error(f"not a valid UTF-8 TOML file: {err}") from None
    table = data.get("plan")
    if not isinstance(table, dict):
        raise where.key("plan").error('a bit plan needs a [plan] table of "layer" = { weight = b, activation = b }')
    plan: BitPlan = {}
    for name, entry in table.items():
        widths = parse(LayerWidths, entry, where.key("plan").key(quote_key(name)))
        plan[name] = (widths.weight, widths.activation)
    return plan


def quote_key(key: str) -> str:
    """A TOML key: bare when it can be, else a quoted string."""
    if key and key.isascii() and all(c.isalnum() or c in "_-" for c in key):
        return key
    return quote_string(key)


def quote_string(text: str) -> str:
    """A TOML basic string, with quotes, backslashes and control characters escaped."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped) + '"'
