"""Write the subset of TOML recipes use: tables, arrays of tables, scalars, lists and inline tables."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .quoting import quote_key, quote_string


def dumps_toml(data: Mapping[str, Any]) -> str:
    """TOML text of ``data`` that ``tomllib.loads`` reads back equal.

    Example usage::

        dumps_toml({"quant": {"weight": {"bits": 4}}})    # '[quant.weight]\\nbits = 4\\n'
    """
    lines: list[str] = []

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return repr(value)
        if isinstance(value, float):
            return (
                repr(value) if math.isfinite(value) else ("nan" if value != value else ("inf" if value > 0 else "-inf"))
            )
        if isinstance(value, str):
            return quote_string(value)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        if isinstance(value, Mapping):
            return "{ " + ", ".join(f"{quote_key(k)} = {scalar(v)}" for k, v in value.items()) + " }"
        raise TypeError(f"cannot write {type(value).__name__} to TOML")

    def table(prefix: str, body: Mapping[str, Any]) -> None:
        plain = {k: v for k, v in body.items() if not _is_table(v) and not _is_table_list(v)}
        if prefix and (plain or not body):
            lines.append(f"\n[{prefix}]")
        for key, value in plain.items():
            lines.append(f"{quote_key(key)} = {scalar(value)}")
        for key, value in body.items():
            sub = f"{prefix}.{quote_key(key)}" if prefix else quote_key(key)
            if _is_table(value):
                table(sub, value)
            elif _is_table_list(value):
                for item in value:
                    lines.append(f"\n[[{sub}]]")
                    for k, v in item.items():
                        lines.append(f"{quote_key(k)} = {scalar(v)}")

    table("", data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)
