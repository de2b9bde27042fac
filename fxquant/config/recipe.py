"""Recipes: TOML files that declare everything a QAT run needs. Loading one never executes code.

A recipe is found by built-in name (``"lsq_w4a4"``, shipped in ``fxquant.recipes``) or by path. ``extends``
names another recipe (built-in, or a path relative to the extending file); tables merge key by key and lists
replace. A ``[bits] plan`` path is relative to the file that declares it, and the plan is read (and checked)
when the recipe loads. The merged tables become typed sections (:mod:`fxquant.config.sections`).
"""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from fxquant.errors import RecipeError, RecipeErrors, closest

from .bit_plan import BitPlan, load_plan
from .fields import Section, Where, parse, setting, shown
from .files import check_depth, contained, parse_toml_bytes, read_toml
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
    raw = (resources.files("fxquant.recipes") / f"{name}.toml").read_bytes()
    return parse_toml_bytes(raw, Where(f"<builtin {name}>"))


def _looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or "/" in text or "\\" in text


MAX_EXTENDS = 16  # recipes extend a few levels; a longer chain is a mistake or an attack


@dataclass(frozen=True)
class _Layer:
    """One file of an ``extends`` chain (or the overrides) with its own tables, to blame a key on the file that
    holds it."""

    source: str
    data: Mapping[str, Any]


def _read(reference: Any, declaring: Path | None, where: Where) -> tuple[dict[str, Any], str, Path | None]:
    """Raw TOML of a built-in name or a path: (data, source label, file path or None).

    A path named by a recipe file (``declaring``) must stay in that file's folder; the recipe a caller names
    directly, or a dict's ``extends``, may be anywhere (relative to the working directory).
    """
    if not isinstance(reference, str):
        raise where.error(f"must be a string (a built-in name or a path), got {shown(reference)}")
    if not _looks_like_path(reference):
        if reference in builtin_names():
            return _builtin(reference), f"<builtin {reference}>", None
        raise where.error(
            f"no built-in recipe named {reference!r}; built-ins: {', '.join(builtin_names())}",
            closest(reference, builtin_names()),
        )
    if declaring is not None:
        path = contained(reference, declaring, where, builtin_ok=True)
    else:
        path = Path(os.path.normpath(reference))
        where = Where(str(path)) if not where.path else where
    return read_toml(path, where), str(path), path


def _anchor_plan(data: dict[str, Any], declaring: Path | None, source: str) -> None:
    """A relative ``[bits] plan`` names a file next to the recipe that declares it: check it and make it absolute
    here, before tables merge, so that a child recipe or overrides never move it. In a file it must stay in the
    file's folder (see :func:`contained`); in a dict or overrides it is relative to the working directory."""
    bits = data.get("bits")
    plan = bits.get("plan") if isinstance(bits, dict) else None
    if plan is None:
        return
    where = Where(source).key("bits").key("plan")
    if declaring is not None:
        bits["plan"] = str(contained(plan, declaring, where))
    elif isinstance(plan, str) and plan:
        bits["plan"] = os.path.normpath(Path.cwd() / plan)


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
    reference: Any, declaring: Path | None, where: Where, seen: tuple[str, ...]
) -> tuple[dict[str, Any], list[_Layer], str, Path | None]:
    """Follow ``extends``: (merged data, the chain's layers base first, source, path)."""
    data, source, path = _read(reference, declaring, where)
    identity = str(path.resolve()) if path is not None else source  # read_toml has opened it: it resolves
    if identity in seen:
        chain = " -> ".join((*seen, identity))
        raise where.error(f"recipes extend each other in a cycle: {chain}")
    if len(seen) >= MAX_EXTENDS:
        raise where.error(f"extends chain longer than {MAX_EXTENDS} recipes")
    _anchor_plan(data, path, source)
    parent = data.pop("extends", None)
    layer = _Layer(source, data)
    if parent is None:
        return data, [layer], source, path
    base, layers, _, _ = _resolve(parent, path, Where(source).key("extends"), (*seen, identity))
    return merge(base, data), [*layers, layer], source, path


def _holds(data: Any, parts: tuple[str | int, ...]) -> bool:
    for part in parts:
        if isinstance(part, int):
            if not isinstance(data, list) or part >= len(data):
                return False
        elif not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _blame(err: RecipeError, layers: list[_Layer]) -> RecipeError:
    """The same error, attributed to the file of the chain that holds the key (the child-most that has the whole
    key path; else the child-most holding the longest part of it): a mistake in a parent names the parent. Each
    problem of a :class:`RecipeErrors` is attributed on its own."""
    if isinstance(err, RecipeErrors):
        return RecipeErrors([_blame(problem, layers) for problem in err.problems])
    parts = err.key_parts
    if len(layers) < 2 or not parts:
        return err
    for length in range(len(parts), 0, -1):
        for layer in reversed(layers):
            if _holds(layer.data, parts[:length]):
                if layer.source == err.source:
                    return err
                moved = RecipeError(layer.source, err.key_path, err.detail, err.suggestion)
                moved.key_parts = parts
                return moved
    return err


def load_recipe(recipe: str | os.PathLike | Recipe | dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
    """Load, merge and validate a recipe. Accepts a built-in name, a path, a dict or a Recipe.

    ``extends`` and ``[bits] plan`` inside a file name a built-in recipe or a ``.toml`` file inside that file's
    folder. ``overrides`` (top-level tables, e.g. ``{"quant": {"weight": {"bits": 3}}}``) merge on top and are
    validated as part of the result; a relative ``bits.plan`` in them (or in a dict recipe) is relative to the
    working directory.

    Example usage::

        recipe = fxquant.load_recipe("lsq_w4a4", {"quant": {"bn": "fold"}})
    """
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        data, source, path = copy.deepcopy(dict(recipe.toml)), recipe.source, recipe.path
        layers = [_Layer(source, data)]
    elif isinstance(recipe, dict):
        data, source, path = copy.deepcopy(recipe), "<dict>", None
        check_depth(data, Where(source))
        _anchor_plan(data, None, source)
        parent = data.pop("extends", None)
        layers = [_Layer(source, data)]
        if parent is not None:
            base, layers, _, _ = _resolve(parent, None, Where(source).key("extends"), ())
            layers = [*layers, _Layer(source, data)]
            data = merge(base, data)
    elif isinstance(recipe, (str, os.PathLike)):
        data, layers, source, path = _resolve(os.fspath(recipe), None, Where(os.fspath(recipe)), ())
    else:
        raise TypeError(f"a recipe is a built-in name, a path, a dict or a Recipe; got {type(recipe).__name__}")
    if overrides:
        overrides = copy.deepcopy(overrides)
        label = f"{source} (overrides)"
        check_depth(overrides, Where(label))
        _anchor_plan(overrides, None, label)
        parse(Recipe, overrides, Where(label))  # blame the overrides for their own mistakes
        data = merge(data, overrides)
        layers = [*layers, _Layer(label, overrides)]
        source = f"{source} (with overrides)"
    return _build(data, source, path, layers)


def recipe_from_text(text: bytes, source: str) -> Recipe:
    """A self-contained recipe stored as TOML text (in a checkpoint): it may not name other files.

    Example usage::

        recipe_from_text(recipe.to_toml().encode(), "model.fxq: recipe")
    """
    where = Where(source)
    data = parse_toml_bytes(text, where)
    for parts in (("extends",), ("bits", "plan")):
        if _holds(data, parts):
            at = where.key(parts[0]) if len(parts) == 1 else where.key(parts[0]).key(parts[1])
            raise at.error("a stored recipe must be self-contained; it may not name another file")
    return _build(data, source, None, [_Layer(source, data)])


def _build(data: dict[str, Any], source: str, path: Path | None, layers: list[_Layer] | None = None) -> Recipe:
    data.pop("extends", None)
    try:
        recipe = parse(Recipe, data, Where(source))
        name = recipe.name or (path.stem if path else source.strip("<>").removeprefix("builtin ").split(" ")[0])
        plan = _bit_plan(recipe.bits, Where(source))
        recipe = replace(recipe, name=name, source=source, path=path, bit_plan=plan, toml=data)
        return replace(recipe, features=feature_plan(recipe))
    except RecipeError as err:
        raise _blame(err, layers or []) from None


def _bit_plan(bits: BitsConfig, where: Where) -> BitPlan | None:
    if bits.plan is not None and bits.layers is not None:
        raise where.key("bits").error("give either plan (a file) or layers (inline), not both")
    if bits.plan is not None:
        return load_plan(bits.plan, where.key("bits").key("plan"))
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
                raise (
                    Where(recipe.source)
                    .key("loss")
                    .index(i)
                    .key("tap")
                    .error(
                        f"no tap named {name!r} (declared taps: {', '.join(sorted(recipe.taps)) or 'none'}) "
                        "and not a selector",
                        closest(name, recipe.taps),
                    )
                )
            taps[name] = selector
            declared[name] = f"loss[{i}]" + (".tap" if selector == name else ".layers")
        if loss.kind == "fpq" and loss.p > 0:
            perturb = (loss.p, loss.layers)
    return FeaturePlan(types.MappingProxyType(taps), perturb, types.MappingProxyType(declared))
