"""The shape of a recipe file: every table, key, type and range, and the validator that walks it.

A schema is made of three node kinds: :class:`Key` (a leaf value), :class:`Table` (fixed keys) and
:class:`TableList` (``[[x]]`` arrays of tables). Validation reports the first problem as a RecipeError with the
file, the key path (``quant.rule[2].weight.bits``) and, for an unknown key, the closest valid one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fxquant.errors import RecipeError, closest
from fxquant.spec import GRANULARITIES, OBSERVERS, SCHEMES, check_bits


@dataclass(frozen=True)
class Key:
    """A leaf: its accepted Python types, optional choices and an extra check returning an error text."""

    types: tuple[type, ...]
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


@dataclass(frozen=True)
class Table:
    keys: dict[str, Key | Table | TableList]
    doc: str = ""
    open: bool = False  # an open table maps any name to ``values`` (e.g. [taps])
    values: Key | Table | None = None


@dataclass(frozen=True)
class TableList:
    item: Table
    doc: str = ""


def _bits_check(value: Any) -> str | None:
    try:
        check_bits(value)
    except ValueError as err:
        return str(err)
    return None


def _positive(value: Any) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def _string_list(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return None
    if isinstance(value, str):
        return None
    return "must be a string or a list of strings"


BITS = Key((int,), check=_bits_check, doc="2..8, or 16/32 for full precision")
NAMES = Key((str, list), check=_string_list)

QUANTIZER = Table(
    {
        "bits": BITS,
        "scheme": Key((str,), choices=SCHEMES),
        "granularity": Key((str,), choices=GRANULARITIES),
        "symmetric": Key((bool,)),
        "observer": Key((str,), choices=OBSERVERS),
    },
    doc="how one tensor is fake-quantized",
)
LAYER_BITS = Table({"weight_bits": BITS, "activation_bits": BITS})
RULE = Table(
    {
        "match": Table({"name": NAMES, "type": NAMES}),
        "weight": QUANTIZER,
        "activation": QUANTIZER,
    }
)

TRAIN = Table(
    {
        "epochs": Key((int,), check=_positive),
        "batch_size": Key((int,), check=_positive),
        "lr": Key((float, int), check=_positive),
        "quantizer_lr": Key((float, int), check=_positive),
        "weight_decay": Key((float, int), check=_non_negative),
        "momentum": Key((float, int), check=_non_negative),
        "optimizer": Key((str,), choices=("sgd", "adamw")),
        "schedule": Key((str,), choices=("cosine", "constant")),
        "warmup_epochs": Key((int,), check=_non_negative),
        "label_smoothing": Key((float, int), check=_non_negative),
    }
)

SCHEMA = Table(
    {
        "name": Key((str,)),
        "description": Key((str,)),
        "extends": Key((str,)),
        "quant": Table(
            {
                "weight": QUANTIZER,
                "activation": QUANTIZER,
                "first_layer": LAYER_BITS,
                "last_layer": LAYER_BITS,
                "bn": Key((str,), choices=("keep", "fold")),
                "leaf_modules": NAMES,
                "rule": TableList(RULE),
            }
        ),
        "train": TRAIN,
    }
)


def type_name(types: tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def validate(data: Any, schema: Table | TableList | Key, source: str, path: str = "") -> None:
    """Raise RecipeError at the first value of ``data`` that does not fit ``schema``.

    Example usage::

        validate({"quant": {"weight": {"bits": 9}}}, SCHEMA, "my.toml")   # RecipeError: quant.weight.bits
    """
    if isinstance(schema, Key):
        _validate_key(data, schema, source, path)
    elif isinstance(schema, TableList):
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise RecipeError(source, path, "must be an array of tables ([[...]] in TOML)")
        for i, item in enumerate(data):
            validate(item, schema.item, source, f"{path}[{i}]")
    else:
        if not isinstance(data, dict):
            raise RecipeError(source, path, "must be a table")
        for key, value in data.items():
            sub = f"{path}.{key}" if path else key
            if key in schema.keys:
                validate(value, schema.keys[key], source, sub)
            elif schema.open and schema.values is not None:
                validate(value, schema.values, source, sub)
            else:
                valid = sorted(schema.keys)
                raise RecipeError(source, sub, f"unknown key; valid keys here: {', '.join(valid)}", closest(key, valid))


def _validate_key(value: Any, key: Key, source: str, path: str) -> None:
    # bool is an int in Python: reject True where a number is expected, and 1 where a bool is.
    ok = isinstance(value, key.types) and not (isinstance(value, bool) and bool not in key.types)
    if not ok:
        raise RecipeError(source, path, f"must be {type_name(key.types)}, got {value!r}")
    if key.choices is not None and value not in key.choices:
        suggestion = closest(value, [str(c) for c in key.choices]) if isinstance(value, str) else None
        raise RecipeError(source, path, f"must be one of {', '.join(map(str, key.choices))}; got {value!r}", suggestion)
    if key.check is not None:
        problem = key.check(value)
        if problem:
            raise RecipeError(source, path, problem)


def describe(schema: Table | TableList | Key = SCHEMA, path: str = "") -> list[tuple[str, str]]:
    """Every key path of the schema with what it accepts."""
    if isinstance(schema, Key):
        text = type_name(schema.types)
        if schema.choices:
            text += f" in {{{', '.join(map(str, schema.choices))}}}"
        if schema.doc:
            text += f" ({schema.doc})"
        return [(path, text)]
    if isinstance(schema, TableList):
        return describe(schema.item, f"{path}[]")
    rows: list[tuple[str, str]] = []
    for key, sub in schema.keys.items():
        rows.extend(describe(sub, f"{path}.{key}" if path else key))
    return rows
