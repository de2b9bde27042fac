"""Recipes: TOML files that declare everything a QAT run needs. Loading one never executes code.

A recipe is found by built-in name (``"lsq_w4a4"``, shipped in ``fxquant.recipes``) or by path. ``extends``
names another recipe (built-in, or a path relative to the extending file); tables merge key by key and lists
replace. A ``[bits] plan`` path is relative to the file that declares it, and the plan is read (and checked)
when the recipe loads. The merged tables become typed sections (:mod:`fxquant.config.sections`).
"""

from __future__ import annotations

import copy
import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from fxquant.errors import RecipeError, closest

from .bit_plan import BitPlan, load_plan
from .fields import Section, Where, parse, setting
from .sections import (
    LOSS_KINDS,
    BitsConfig,
    CoresetConfig,
    DataSection,
    LossConfig,
    OptimSection,
    QuantSection,
    SAMConfig,
    SearchConfig,
    TrainConfig,
    ZeroShotConfig,
    selector_problem,
)
from .toml_text import dumps_toml


@dataclass(frozen=True)
class FeaturePlan:
    """What a recipe adds to the graph besides quantizers: feature taps (name → selector) and FPQ's
    perturbation (probability, op type), derived from ``[taps]`` and the ``[[loss]]`` tables."""

    taps: Mapping[str, str]
    perturb: tuple[float, str] | None = None
    # which key declared each tap, for errors about selectors that match nothing in a model
    declared_by: Mapping[str, str] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict) -> object:
        return self  # frozen and read-only


@dataclass(frozen=True)
class Recipe(Section):
    """A validated recipe: one typed section per table.

    Example usage::

        recipe = fxquant.load_recipe("lsq_w4a4")
        recipe.quant.weight.bits      # 4
        recipe.train.override(epochs=1)
    """

    name: str = setting("")
    description: str = setting("")
    extends: str | None = setting(None, doc="a built-in name or a path relative to this file")
    quant: QuantSection = setting(QuantSection())
    train: TrainConfig = setting(TrainConfig())
    taps: dict[str, str] = setting(
        factory=lambda: types.MappingProxyType({}), check=selector_problem, doc="tap name = selector"
    )
    loss: tuple[LossConfig, ...] = setting((), variants=LOSS_KINDS, doc="auxiliary losses, by kind")
    data: DataSection = setting(DataSection())
    zeroshot: ZeroShotConfig | None = setting(None, doc="zero-shot quantization (LRQ)")
    optim: OptimSection = setting(OptimSection())
    bits: BitsConfig = setting(BitsConfig())
    search: SearchConfig | None = setting(None, doc="per-layer bit search before training")
    # Set by loading, not by files:
    source: str = field(default="<dict>", metadata={"internal": True})  # a label for messages
    path: Path | None = field(default=None, metadata={"internal": True})  # the file, for file recipes
    bit_plan: Mapping[str, tuple[int | None, int | None]] | None = field(default=None, metadata={"internal": True})
    features: FeaturePlan = field(default_factory=lambda: FeaturePlan({}), metadata={"internal": True})
    toml: Mapping[str, Any] = field(default_factory=dict, metadata={"internal": True}, repr=False)

    @property
    def losses(self) -> tuple[LossConfig, ...]:
        return self.loss

    @property
    def sam(self) -> SAMConfig | None:
        return self.optim.sam

    @property
    def coreset(self) -> CoresetConfig | None:
        return self.data.coreset

    def float_model_uses(self) -> list[str]:
        """What in this recipe needs the float model (empty when nothing does)."""
        uses = [f"loss[{i}] ({loss.kind})" for i, loss in enumerate(self.loss) if loss.teacher_kind == "fp"]
        if self.coreset is not None and self.coreset.needs_fp:
            uses.append("data.coreset (the disagreement score)")
        if self.zeroshot is not None:
            uses.append("zeroshot")
        return uses

    def to_toml(self) -> str:
        """The merged recipe as TOML text, self-contained: ``extends`` resolved and a bit plan written inline."""
        data = copy.deepcopy(dict(self.toml))
        if self.bit_plan is not None:
            layers = {
                n: {k: v for k, v in (("weight", w), ("activation", a)) if v is not None}
                for n, (w, a) in self.bit_plan.items()
            }
            data["bits"] = {"layers": layers}
        return dumps_toml(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Recipe:
        """Validate a recipe given as a dict (``extends`` is not followed here)."""
        return _build(copy.deepcopy(data), source, None)


def builtin_names() -> list[str]:
    """Names of the recipes shipped with fxquant."""
    folder = resources.files("fxquant.recipes")
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def _builtin(name: str) -> dict[str, Any]:
    text = (resources.files("fxquant.recipes") / f"{name}.toml").read_text(encoding="utf-8")
    return _parse_toml(text, f"<builtin {name}>")


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(source, "", f"not valid TOML: {err}") from None


def _looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or "/" in text or "\\" in text


def _read(name_or_path: str | Path, relative_to: Path | None) -> tuple[dict[str, Any], str, Path | None]:
    """Raw TOML of a built-in name or a path: (data, source label, file path or None)."""
    text = str(name_or_path)
    if not _looks_like_path(text):
        if text in builtin_names():
            return _builtin(text), f"<builtin {text}>", None
        raise RecipeError(
            text,
            "",
            f"no built-in recipe of that name; built-ins: {', '.join(builtin_names())}",
            closest(text, builtin_names()),
        )
    path = Path(text)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    path = Path(os.path.normpath(path))
    if not path.is_file():
        raise RecipeError(str(path), "", "recipe file not found")
    return _parse_toml(path.read_text(encoding="utf-8"), str(path)), str(path), path


def _anchor_plan(data: dict[str, Any], folder: Path | None) -> None:
    """A relative ``[bits] plan`` names a file next to the recipe that declares it: make it absolute here,
    before tables merge, so that a child recipe or overrides never move it."""
    bits = data.get("bits")
    plan = bits.get("plan") if isinstance(bits, dict) else None
    if isinstance(plan, str) and not Path(plan).is_absolute():
        bits["plan"] = os.path.normpath((folder or Path.cwd()) / plan)


def merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (values, lists) in ``override`` replaces ``base``'s."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve(
    name_or_path: str | Path, relative_to: Path | None, seen: tuple[str, ...]
) -> tuple[dict, str, Path | None]:
    data, source, path = _read(name_or_path, relative_to)
    _anchor_plan(data, path.parent if path else None)
    if source in seen:
        raise RecipeError(source, "extends", f"recipes extend each other in a cycle: {' -> '.join((*seen, source))}")
    parent = data.pop("extends", None)
    if parent is None:
        return data, source, path
    if not isinstance(parent, str):
        raise RecipeError(source, "extends", f"must be a string, got {parent!r}")
    base, _, _ = _resolve(parent, path.parent if path else None, (*seen, source))
    return merge(base, data), source, path


def load_recipe(recipe: str | os.PathLike | Recipe | dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
    """Load, merge and validate a recipe. Accepts a built-in name, a path, a dict or a Recipe.

    ``overrides`` (top-level tables, e.g. ``{"quant": {"weight": {"bits": 3}}}``) merge on top and are
    validated as part of the result; a relative ``bits.plan`` in them is relative to the working directory.

    Example usage::

        recipe = fxquant.load_recipe("lsq_w4a4", {"quant": {"bn": "fold"}})
    """
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        data, source, path = copy.deepcopy(dict(recipe.toml)), recipe.source, recipe.path
    elif isinstance(recipe, dict):
        data, source, path = copy.deepcopy(recipe), "<dict>", None
        _anchor_plan(data, None)
        parent = data.pop("extends", None)
        if parent is not None:
            if not isinstance(parent, str):
                raise RecipeError(source, "extends", f"must be a string, got {parent!r}")
            base, _, _ = _resolve(parent, None, ())
            data = merge(base, data)
    else:
        data, source, path = _resolve(recipe, None, ())
    if overrides:
        overrides = copy.deepcopy(overrides)
        _anchor_plan(overrides, None)
        parse(Recipe, overrides, Where(f"{source} (overrides)"))  # blame the overrides for their own mistakes
        data = merge(data, overrides)
        source = f"{source} (with overrides)"
    return _build(data, source, path)


def _build(data: dict[str, Any], source: str, path: Path | None) -> Recipe:
    data.pop("extends", None)
    recipe = parse(Recipe, data, Where(source))
    name = recipe.name or (path.stem if path else source.strip("<>").removeprefix("builtin ").split(" ")[0])
    plan = _bit_plan(recipe.bits, source)
    recipe = replace(recipe, name=name, source=source, path=path, bit_plan=plan, toml=data)
    return replace(recipe, features=feature_plan(recipe))


def _bit_plan(bits: BitsConfig, source: str) -> BitPlan | None:
    if bits.plan is not None and bits.layers is not None:
        raise RecipeError(source, "bits", "give either plan (a file) or layers (inline), not both")
    if bits.plan is not None:
        return load_plan(bits.plan)
    return bits.widths()


def feature_plan(recipe: Recipe) -> FeaturePlan:
    """Taps and perturbation a recipe needs: its ``[taps]`` plus what its losses read. A loss's ``tap`` is a
    declared tap name or a selector; anything else is a RecipeError at ``loss[i].tap``."""
    taps = dict(recipe.taps)
    declared = {name: f"taps.{name}" for name in taps}
    perturb = None
    for i, loss in enumerate(recipe.loss):
        for name, selector in loss.taps().items():
            if name in taps:
                continue
            if selector_problem(selector):
                raise RecipeError(
                    recipe.source,
                    f"loss[{i}].tap",
                    f"no tap named {name!r} (declared taps: {', '.join(sorted(recipe.taps)) or 'none'}) "
                    "and not a selector",
                    closest(name, recipe.taps),
                )
            taps[name] = selector
            declared[name] = f"loss[{i}]" + (".tap" if selector == name else ".layers")
        if loss.kind == "fpq" and loss.p > 0:
            perturb = (loss.p, loss.layers)
    return FeaturePlan(types.MappingProxyType(taps), perturb, types.MappingProxyType(declared))
