"""Recipes: TOML files that declare everything a QAT run needs. Loading one never executes code.

A recipe is found by built-in name (``"lsq_w4a4"``, shipped in ``fxquant.recipes``) or by path. ``extends``
names another recipe (built-in, or a path relative to the extending file); tables merge key by key and lists
replace. The merged result is validated against :data:`fxquant.recipe_schema.SCHEMA` before anything uses it.
"""

from __future__ import annotations

import copy
import fnmatch
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fxquant.errors import RecipeError, closest
from fxquant.recipe_schema import SCHEMA, validate
from fxquant.spec import QuantizerConfig

DEFAULT_WEIGHT = {"bits": 8, "scheme": "lsq", "granularity": "per_channel", "symmetric": True}
DEFAULT_ACTIVATION = {"bits": 8, "scheme": "lsq", "granularity": "per_tensor", "symmetric": False}


@dataclass(frozen=True)
class Rule:
    """One ``[[quant.rule]]``: layers whose name and type match get these weight/activation overrides."""

    index: int
    names: tuple[str, ...]
    types: tuple[str, ...]
    weight: dict[str, Any]
    activation: dict[str, Any]

    def matches(self, layer_name: str, layer_type: str) -> bool:
        """Glob match on the qualified name; case-insensitive match on the type (``Conv2d`` also matches
        a functional ``conv2d``)."""
        name_ok = not self.names or any(fnmatch.fnmatchcase(layer_name, pattern) for pattern in self.names)
        type_ok = not self.types or layer_type.lower() in {t.lower() for t in self.types}
        return name_ok and type_ok

    @property
    def key_path(self) -> str:
        return f"quant.rule[{self.index}]"


@dataclass(frozen=True)
class QuantRecipe:
    weight: QuantizerConfig
    activation: QuantizerConfig
    first_layer: dict[str, int]
    last_layer: dict[str, int]
    bn: str
    leaf_modules: tuple[str, ...]
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Recipe:
    """A validated recipe.

    Example usage::

        recipe = fxquant.load_recipe("lsq_w4a4")
        recipe.quant.weight.bits      # 4
    """

    name: str
    description: str
    source: str
    data: dict[str, Any] = field(repr=False)
    quant: QuantRecipe = field(repr=False)

    @property
    def train(self) -> dict[str, Any]:
        return dict(self.data.get("train", {}))

    @property
    def taps(self) -> dict[str, str]:
        """``[taps]``: tap name → selector."""
        return dict(self.data.get("taps", {}))

    @property
    def losses(self) -> list[dict[str, Any]]:
        """``[[loss]]``: one table per auxiliary loss, with its ``kind``."""
        return [dict(loss) for loss in self.data.get("loss", [])]

    def to_toml(self) -> str:
        """The merged recipe as TOML text (``extends`` resolved), for saving next to a checkpoint."""
        return dumps_toml(self.data)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Recipe:
        """Validate a recipe given as a dict (``extends`` is not followed here)."""
        validate(data, SCHEMA, source)
        return _build(copy.deepcopy(data), source)


def builtin_names() -> list[str]:
    """Names of the recipes shipped with fxquant."""
    folder = resources.files("fxquant.recipes")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read(name_or_path: str | Path, relative_to: Path | None = None) -> tuple[dict[str, Any], str, Path | None]:
    """Raw TOML of a built-in name or a path: (data, source label, directory for relative extends)."""
    text_path = str(name_or_path)
    looks_like_path = text_path.endswith(".toml") or "/" in text_path or "\\" in text_path
    if not looks_like_path:
        if text_path in builtin_names():
            resource = resources.files("fxquant.recipes") / f"{text_path}.toml"
            return (
                _parse(resource.read_text(encoding="utf-8"), f"<builtin {text_path}>"),
                f"<builtin {text_path}>",
                None,
            )
        raise RecipeError(
            text_path,
            "",
            f"no built-in recipe of that name; built-ins: {', '.join(builtin_names())}",
            closest(text_path, builtin_names()),
        )
    path = Path(text_path)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if not path.is_file():
        raise RecipeError(str(path), "", "recipe file not found")
    return _parse(path.read_text(encoding="utf-8"), str(path)), str(path), path.parent


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(source, "", f"not valid TOML: {err}") from None


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (values, lists) in ``override`` replaces ``base``'s."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve(name_or_path: str | Path, relative_to: Path | None, seen: tuple[str, ...]) -> tuple[dict, str]:
    data, source, folder = _read(name_or_path, relative_to)
    if source in seen:
        chain = " -> ".join((*seen, source))
        raise RecipeError(source, "extends", f"recipes extend each other in a cycle: {chain}")
    parent = data.get("extends")
    if parent is None:
        return data, source
    if not isinstance(parent, str):
        raise RecipeError(source, "extends", f"must be a string, got {parent!r}")
    base, _ = _resolve(parent, folder, (*seen, source))
    own = {k: v for k, v in data.items() if k != "extends"}
    return merge(base, own), source


def load_recipe(recipe: str | Path | Recipe | dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
    """Load, merge and validate a recipe. Accepts a built-in name, a path, a dict or a Recipe.

    ``overrides`` (top-level tables, e.g. ``{"quant": {"weight": {"bits": 3}}}``) merge on top and are
    validated as part of the result.

    Example usage::

        recipe = fxquant.load_recipe("lsq_w4a4", {"quant": {"bn": "fold"}})
    """
    if isinstance(recipe, Recipe):
        data, source = copy.deepcopy(recipe.data), recipe.source
    elif isinstance(recipe, dict):
        data, source = copy.deepcopy(recipe), "<dict>"
        if "extends" in data:
            base, _ = _resolve(data.pop("extends"), None, ())
            data = merge(base, data)
    else:
        data, source = _resolve(recipe, None, ())
    if overrides:
        validate(overrides, SCHEMA, f"{source} (overrides)")
        data = merge(data, overrides)
        source = f"{source} (with overrides)"
    data.pop("extends", None)
    validate(data, SCHEMA, source)
    return _build(data, source)


def _as_tuple(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _config(table: dict[str, Any], defaults: dict[str, Any], source: str, path: str) -> QuantizerConfig:
    try:
        return QuantizerConfig(**{**defaults, **table})
    except ValueError as err:
        raise RecipeError(source, path, str(err)) from None


def _build(data: dict[str, Any], source: str) -> Recipe:
    quant = data.get("quant", {})
    weight = _config(quant.get("weight", {}), DEFAULT_WEIGHT, source, "quant.weight")
    activation = _config(quant.get("activation", {}), DEFAULT_ACTIVATION, source, "quant.activation")
    rules = []
    for i, rule in enumerate(quant.get("rule", [])):
        match = rule.get("match", {})
        built = Rule(
            i,
            _as_tuple(match.get("name")),
            _as_tuple(match.get("type")),
            dict(rule.get("weight", {})),
            dict(rule.get("activation", {})),
        )
        # Check now that the overrides make valid configs, so errors point at the rule, not at prepare time.
        _config(built.weight, {**DEFAULT_WEIGHT, **quant.get("weight", {})}, source, f"{built.key_path}.weight")
        _config(
            built.activation,
            {**DEFAULT_ACTIVATION, **quant.get("activation", {})},
            source,
            f"{built.key_path}.activation",
        )
        rules.append(built)
    quant_recipe = QuantRecipe(
        weight=weight,
        activation=activation,
        first_layer=dict(quant.get("first_layer", {})),
        last_layer=dict(quant.get("last_layer", {})),
        bn=quant.get("bn", "keep"),
        leaf_modules=_as_tuple(quant.get("leaf_modules")),
        rules=tuple(rules),
    )
    name = data.get("name") or Path(source.strip("<>").removeprefix("builtin ")).stem
    return Recipe(name=name, description=data.get("description", ""), source=source, data=data, quant=quant_recipe)


def dumps_toml(data: dict[str, Any]) -> str:
    """Write the subset of TOML recipes use (tables, arrays of tables, scalars, lists of scalars)."""
    lines: list[str] = []

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{ " + ", ".join(f"{k} = {scalar(v)}" for k, v in value.items()) + " }"
        raise TypeError(f"cannot write {type(value).__name__} to TOML")

    def table(prefix: str, body: dict[str, Any]) -> None:
        plain = {k: v for k, v in body.items() if not _is_table(v) and not _is_table_list(v)}
        if prefix and (plain or not body):
            lines.append(f"\n[{prefix}]")
        for key, value in plain.items():
            lines.append(f"{key} = {scalar(value)}")
        for key, value in body.items():
            sub = f"{prefix}.{key}" if prefix else key
            if _is_table(value):
                table(sub, value)
            elif _is_table_list(value):
                for item in value:
                    lines.append(f"\n[[{sub}]]")
                    for k, v in item.items():
                        lines.append(f"{k} = {scalar(v)}")

    table("", data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
