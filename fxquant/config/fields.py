"""Typed recipe tables: a frozen dataclass per TOML table, validated from its own fields.

A section declares each key once, as a dataclass field: its Python type (``int``, ``float``, ``bool``, ``str``,
``tuple[T, ...]``, ``dict[str, T]``, a nested section, ``X | None``), its default, and in ``metadata`` (written
with :func:`setting`) its choices, an extra check and a one-line doc. :func:`parse` turns a TOML table into the
dataclass or raises a :class:`~fxquant.errors.RecipeError` naming the file, the key path (``loss[1].p``) and,
for a misspelt key or choice, the nearest valid one. So adding a key to a recipe is adding a field.

Example usage::

    @dataclass(frozen=True)
    class Train(Section):
        epochs: int = setting(1, check=positive, doc="passes over the data")

    parse(Train, {"epochs": 3}, Where("my.toml", "train"))     # Train(epochs=3)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any, TypeVar

from fxquant.errors import RecipeError, closest, raise_problems, recipe_problems

from .quoting import quote_key

T = TypeVar("T")
Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Where:
    """The place a value came from: the file (or label) and the key path inside it. ``parts`` holds the path's
    keys and indices as they are in the table (``("loss", 1, "tap")``), to find which file of an ``extends``
    chain holds a key; ``path`` is how the path reads, keys quoted when they are not bare."""

    source: str
    path: str = ""
    parts: tuple[str | int, ...] = ()

    def key(self, name: str) -> Where:
        shown = quote_key(name) if isinstance(name, str) else repr(name)
        return Where(self.source, f"{self.path}.{shown}" if self.path else shown, (*self.parts, name))

    def index(self, i: int) -> Where:
        return Where(self.source, f"{self.path}[{i}]", (*self.parts, i))

    def error(self, message: str, suggestion: str | None = None) -> RecipeError:
        error = RecipeError(self.source, self.path, message, suggestion)
        error.key_parts = self.parts
        return error


def setting(
    default: Any = MISSING,
    *,
    doc: str = "",
    choices: tuple[Any, ...] | None = None,
    check: Check | None = None,
    one_or_many: bool = False,
    variants: Mapping[str, type] | None = None,
    tag: str = "kind",
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A section field with its validation: ``choices`` (allowed values), ``check`` (returns an error text or
    None; applied to each element of a tuple), ``one_or_many`` (a tuple field that also takes a single string),
    ``variants`` (a tuple of tagged tables: the ``tag`` key picks the dataclass of each element); ``factory``
    makes the default of an unhashable (mapping) field."""
    metadata = {"doc": doc, "choices": choices, "check": check, "one_or_many": one_or_many, "variants": variants}
    metadata["tag"] = tag
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or a frozen mapping as a section default, not a mutable value")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Section:
    """Mixin of every typed table: values are validated at construction (from the fields' declarations), and
    :meth:`override` makes a validated copy with some keys changed."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in toml_fields(type(self)):
            value = getattr(self, f.name)
            _, tp = _is_optional(hints[f.name])
            if value is None or dataclasses.is_dataclass(value) or _holds_sections(tp):
                continue  # nested sections validated themselves
            plain = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, Mapping) else value
            try:
                _value(plain, tp, f.metadata, Where(type(self).__name__, f.name))
            except RecipeError as err:
                raise ValueError(f"{f.name}: {err.detail}") from None

    def __deepcopy__(self, memo: dict) -> Section:
        return self  # frozen, and every value immutable: a copy would be equal and gain nothing

    def override(self: T, **changes: Any) -> T:
        """A copy with ``changes`` applied, validated like a recipe table.

        Example usage::

            recipe.train.override(epochs=1, lr=0.05)
        """
        return parse(type(self), changes, Where("<override>", type(self).__name__), base=self)


# -- checks shared by sections --------------------------------------------------------------------------------
def positive(value: Any) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def probability(value: Any) -> str | None:
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {value}"


def open_unit(value: Any) -> str | None:
    return None if 0 < value < 1 else f"must be in (0, 1), got {value}"


def fraction(value: Any) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1] (a fraction of the training set), got {value}"


# -- the parser ----------------------------------------------------------------------------------------------
_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _holds_sections(tp: Any) -> bool:
    """A tuple or mapping of sections (each validated on construction)."""
    args = typing.get_args(tp)
    return bool(args) and dataclasses.is_dataclass(args[-1] if typing.get_origin(tp) is dict else args[0])


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """(True, X) for ``X | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def describe_type(tp: Any) -> str:
    """How a type reads in an error message or the key reference."""
    _, tp = _is_optional(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {describe_type(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a table"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _scalar(value: Any, tp: type, where: Where) -> Any:
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise where.error(f"must be {_NAMES.get(tp, tp.__name__)}, got {shown(value)}")
    if tp is int and not -(2**63) <= value < 2**63:
        raise where.error(f"must fit in 64 bits, got an integer of {value.bit_length()} bits")
    if tp is str and not _plain_text(value):
        raise where.error(f"contains control characters: {shown(value)}")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise where.error(f"must be a finite number, got {value!r}")
    return value


def _plain_text(text: str) -> bool:
    """No control or invisible formatting characters besides line breaks and tabs (names and descriptions are
    echoed to terminals)."""
    return text.isprintable() or all(c.isprintable() or c in "\n\t" for c in text)


def shown(value: Any, limit: int = 60) -> str:
    """A value as an error message shows it: its repr, shortened (a hostile file may hold megabytes)."""
    if isinstance(value, (dict, list)):
        return f"a {'table' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _value(value: Any, tp: Any, meta: Mapping[str, Any], where: Where, base: Any = None) -> Any:
    """Parse one value of declared type ``tp`` (with the field's metadata)."""
    _, tp = _is_optional(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if meta.get("one_or_many") and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise where.error(f"must be {describe_type(tp)}, got {shown(value)}")
        variants = meta.get("variants")
        item_meta = {"choices": meta.get("choices"), "check": meta.get("check")}
        items, problems = [], []
        for i, item in enumerate(value):  # every item checked: all their problems are reported together
            try:
                if variants is not None:
                    items.append(_tagged(item, variants, meta.get("tag", "kind"), where.index(i)))
                else:
                    items.append(_value(item, item_tp, item_meta, where.index(i)))
            except RecipeError as err:
                problems += recipe_problems(err)
        raise_problems(problems)
        return tuple(items)
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise where.error("must be a table")
        for k in value:
            if not _plain_text(k) or "\n" in k:
                raise where.key(k).error("a key may not contain control characters")
        return types.MappingProxyType({k: _value(v, value_tp, meta, where.key(k)) for k, v in value.items()})
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where, base=base)
    value = _scalar(value, tp, where)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        hint = closest(value, [str(c) for c in choices]) if isinstance(value, str) else None
        raise where.error(f"must be one of {', '.join(map(str, choices))}; got {shown(value)}", hint)
    check = meta.get("check")
    if check is not None:
        problem = check(value)
        if problem:
            raise where.error(problem)
    return value


def _tagged(value: Any, variants: Mapping[str, type], tag: str, where: Where) -> Any:
    if not isinstance(value, dict):
        raise where.error("must be a table")
    kind = value.get(tag)
    if kind not in variants:
        kinds = sorted(variants)
        hint = closest(kind, kinds) if isinstance(kind, str) else None
        raise where.key(tag).error(f"must be one of {', '.join(kinds)}; got {shown(kind)}", hint)
    return parse(variants[kind], {k: v for k, v in value.items() if k != tag}, where)


def toml_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a section that are recipe keys (``internal`` ones are set by code, not by files)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def parse(cls: type[T], table: Any, where: Where, base: T | None = None) -> T:
    """Build section ``cls`` from a TOML table; keys not in the table keep ``base``'s value (or the default).

    Raises RecipeError for every key that does not fit, found in one pass (:class:`RecipeErrors` when there are
    several, one line each): unknown (with the nearest key), of the wrong type, out of range, or a required key
    that is missing.
    """
    if not isinstance(table, dict):
        raise where.error("must be a table")
    hints = _hints(cls)
    known = {f.name: f for f in toml_fields(cls)}
    problems: list[RecipeError] = []
    for key in table:
        if key not in known:
            valid = sorted(known)
            problems.append(
                where.key(key).error(
                    f"unknown key; valid keys here: {', '.join(valid)}",
                    closest(key, valid) if isinstance(key, str) else None,
                )
            )
    values: dict[str, Any] = {}
    for name, f in known.items():
        current = getattr(base, name) if base is not None else _default(f)
        if name in table:
            # a nested table is parsed onto the current value (a partial table changes only its own keys)
            nested_base = current if dataclasses.is_dataclass(current) else None
            try:
                values[name] = _value(table[name], hints[name], f.metadata, where.key(name), nested_base)
            except RecipeError as err:
                problems += recipe_problems(err)
        elif current is MISSING:
            problems.append(where.key(name).error("missing: this key is required"))
    raise_problems(problems)
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except (ValueError, TypeError) as err:  # a section's own cross-key checks (__post_init__)
        raise where.error(str(err)) from None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def describe(cls: type, path: str = "") -> list[tuple[str, str]]:
    """Every key path under section ``cls`` with what it accepts and its doc (``fxquant recipes --keys``)."""
    rows: list[tuple[str, str]] = []
    hints = _hints(cls)
    for f in toml_fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        _, tp = _is_optional(hints[f.name])
        variants = f.metadata.get("variants")
        if variants:
            for kind, variant in variants.items():
                rows.extend(describe(variant, f"{key}[{f.metadata.get('tag', 'kind')}={kind}]"))
            continue
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        origin_args = typing.get_args(tp)
        if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(origin_args[0]):
            rows.extend(describe(origin_args[0], f"{key}[]"))
            continue
        text = describe_type(tp)
        if f.metadata.get("choices"):
            text += f" in {{{', '.join(map(str, f.metadata['choices']))}}}"
        if f.metadata.get("doc"):
            text += f" ({f.metadata['doc']})"
        rows.append((key, text))
    return rows
