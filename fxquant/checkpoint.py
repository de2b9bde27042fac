"""Saving and loading prepared models: the recipe travels with the weights.

A checkpoint is a plain dict readable with ``torch.load(weights_only=True)`` (no pickled code): the merged
recipe as self-contained TOML text (a bit plan written inline), the prepare options, the bit plan in force (from
the recipe or a search), every quantizer's run-time state (bit width, on/off, observing) and the ``state_dict``.
Loading re-runs ``prepare_qat`` on the float architecture with that recipe, restores the run-time state and the
plan, then loads the tensors strictly, so a reloaded model computes bit-identical outputs and a resumed
``[search]`` recipe does not search again.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxquant.api import prepare_qat
from fxquant.config import Recipe
from fxquant.errors import FxQuantError
from fxquant.qat_model import QATModel
from fxquant.quant.quantizers import FakeQuantizer

FORMAT = "fxquant-checkpoint/1"


class CheckpointError(FxQuantError):
    """A file is not an fxquant checkpoint, or does not fit the model it is loaded into."""


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _is_rank_zero() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _quantizer_state(q: FakeQuantizer) -> dict[str, Any]:
    state: dict[str, Any] = {"bits": q.bits, "enabled": q.enabled}
    if hasattr(q, "observing"):
        state["observing"] = q.observing
    return state


def save(qmodel: QATModel | nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path | None:
    """Write ``qmodel`` (recipe, quantizer state, weights) to ``path``. Under torch.distributed only rank 0
    writes (the others return None). ``extra`` is stored as is (numbers, strings, lists, dicts, tensors).

    Example usage::

        fxquant.save(qmodel, "resnet20_w4a4.pt", extra={"epoch": 3})
    """
    qmodel = _unwrap(qmodel)
    if not isinstance(qmodel, QATModel):
        raise CheckpointError(f"fxquant.save expects the QATModel prepare_qat returned, got {type(qmodel).__name__}")
    if not _is_rank_zero():
        return None
    options = qmodel.options
    plan = qmodel.bit_plan or {}
    payload = {
        "format": FORMAT,
        "recipe_toml": qmodel.recipe.to_toml(),
        "recipe_source": qmodel.recipe.source,
        "leaf_modules": list(options.leaf_modules),
        "concrete_args": sorted(options.concrete_args),
        "bit_plan": {name: [w, a] for name, (w, a) in plan.items()} if qmodel.bit_plan is not None else None,
        "quantizers": {name: _quantizer_state(q) for name, q in qmodel.quantizers().items()},
        "state_dict": qmodel.state_dict(),
        "extra": extra or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's contents as a dict (``weights_only`` loading), after checking its format."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path}: not an fxquant checkpoint (format {found!r}, expected {FORMAT!r}); a plain float state_dict "
            "is loaded with model.load_state_dict before prepare_qat"
        )
    return payload


def load(
    path: str | os.PathLike,
    model: nn.Module,
    example_inputs: Any = None,
    *,
    concrete_args: dict[str, Any] | None = None,
    float_model: nn.Module | None = None,
) -> QATModel:
    """Re-prepare ``model`` (the float architecture; its weights are replaced) with the recipe stored in
    ``path`` and load the saved state. ``concrete_args`` must be given again if prepare_qat had them; a recipe
    whose losses distil from the FP model needs that model as ``float_model`` to go on training.

    Example usage::

        qmodel = fxquant.load("resnet20_w4a4.pt", fxquant.models.resnet20())
    """
    payload = read(path)
    if payload["concrete_args"] and not concrete_args:
        raise CheckpointError(
            f"{path}: the model was prepared with concrete_args {payload['concrete_args']}; pass them to load()"
        )
    recipe = Recipe.from_dict(tomllib.loads(payload["recipe_toml"]), f"{path} (saved from {payload['recipe_source']})")
    qmodel = prepare_qat(
        model,
        recipe,
        example_inputs,
        leaf_modules=payload["leaf_modules"],
        concrete_args=concrete_args,
        float_model=float_model if float_model is not None else False,
    )
    quantizers = qmodel.quantizers()
    missing = sorted(set(payload["quantizers"]) - set(quantizers))
    if missing or len(quantizers) != len(payload["quantizers"]):
        raise CheckpointError(
            f"{path}: the saved model has {len(payload['quantizers'])} quantizers, this one {len(quantizers)}"
            + (f"; not found here: {', '.join(missing[:5])}" if missing else "")
            + " — is it the same architecture?"
        )
    for name, state in payload["quantizers"].items():
        q = quantizers[name]
        q.enabled = state["enabled"]
        if "observing" in state:
            q.observing = state["observing"]
        q.set_bits(state["bits"], keep_range=False)  # the saved steps already belong to this width
    if payload.get("bit_plan") is not None:
        qmodel.bit_plan = {name: (w, a) for name, (w, a) in payload["bit_plan"].items()}
    try:
        qmodel.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the saved state does not fit this model: {err}") from None
    return qmodel
