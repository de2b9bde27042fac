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
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxquant.api import prepare_qat
from fxquant.config import recipe_from_text
from fxquant.errors import FxQuantError, RecipeError, printable
from fxquant.qat_model import QATModel
from fxquant.quant.quantizers import FakeQuantizer
from fxquant.quant.spec import bits_problem
from fxquant.train.devices import model_device, resolve_device

FORMAT = "fxquant-checkpoint/1"


class CheckpointError(FxQuantError):
    """A file is not an fxquant checkpoint, holds malformed content, or does not fit the model it is loaded into.
    The message is one line naming the file (and the field)."""

    def __init__(self, message: str):
        super().__init__(printable(message))


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


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


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, every failure a one-line CheckpointError naming the file.
    A file holding pickled code is refused with a warning never to load it with ``weights_only=False``.

    Example usage::

        state = safe_load("resnet20_fp.pt")
    """
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"{path}: no such file")
    if not file.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message suggests retrying with weights_only=False; it is never relayed
        if "unsupported global" not in str(err).lower():  # bytes the safe loader cannot read, not a refused class
            raise CheckpointError(
                f"{path}: not a loadable checkpoint (the safe loader cannot read its pickle data; "
                "do not retry with weights_only=False)"
            ) from None
        raise CheckpointError(
            f"{path}: refused: the file contains pickled code or objects, which an fxquant checkpoint never does; "
            "do not load it with weights_only=False (that would run whatever code it holds)"
        ) from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {_first_line(err)})") from None


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's contents as a dict (``weights_only`` loading), after checking every field's type.

    Example usage::

        fxquant.checkpoint.read("resnet20_w4a4.pt")["extra"]
    """
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path}: not an fxquant checkpoint (format {found!r}, expected {FORMAT!r}); a plain float state_dict "
            "is loaded with model.load_state_dict before prepare_qat"
        )
    _check_fields(payload, path)
    return payload


def _check_fields(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Every field an fxquant checkpoint holds, with the type it must have: a malformed or tampered file is a
    CheckpointError naming the field, never a KeyError or TypeError later."""

    def fail(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: {field}: {problem}")

    def strings(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    expected = {
        "recipe_toml": (lambda v: isinstance(v, str), "must be TOML text"),
        "recipe_source": (lambda v: isinstance(v, str), "must be a string"),
        "leaf_modules": (strings, "must be a list of module names"),
        "concrete_args": (strings, "must be a list of argument names"),
        "bit_plan": (lambda v: v is None or isinstance(v, dict), "must be a table of layer widths or absent"),
        "quantizers": (lambda v: isinstance(v, dict), "must be a table of quantizer states"),
        "state_dict": (lambda v: isinstance(v, dict), "must be a state_dict"),
        "extra": (lambda v: isinstance(v, dict), "must be a table"),
    }
    for field, (ok, problem) in expected.items():
        if field not in payload:
            raise fail(field, "missing")
        if not ok(payload[field]):
            raise fail(field, f"{problem}, got {type(payload[field]).__name__}")
    unknown = sorted(set(payload) - set(expected) - {"format"})
    if unknown:
        raise fail(str(unknown[0]), "unknown field")
    for name, widths in (payload["bit_plan"] or {}).items():
        if not (isinstance(widths, list) and len(widths) == 2):
            raise fail(f"bit_plan.{name}", "must be [weight bits, activation bits]")
        for width in widths:
            if width is not None and bits_problem(width):
                raise fail(f"bit_plan.{name}", bits_problem(width))
    for name, state in payload["quantizers"].items():
        where = f"quantizers.{name}"
        if not isinstance(state, dict):
            raise fail(where, "must be a table")
        if set(state) - {"bits", "enabled", "observing"} or not {"bits", "enabled"} <= set(state):
            raise fail(where, f"must hold bits, enabled and optionally observing; has {', '.join(map(str, state))}")
        if bits_problem(state["bits"]):
            raise fail(f"{where}.bits", bits_problem(state["bits"]))
        for flag in ("enabled", "observing"):
            if flag in state and not isinstance(state[flag], bool):
                raise fail(f"{where}.{flag}", f"must be true or false, got {state[flag]!r}")
    for name, tensor in payload["state_dict"].items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise fail(f"state_dict.{name}", f"must be a tensor, got {type(tensor).__name__}")


def load(
    path: str | os.PathLike,
    model: nn.Module,
    example_inputs: Any = None,
    *,
    concrete_args: dict[str, Any] | None = None,
    float_model: nn.Module | None = None,
    map_location: str | torch.device | None = None,
) -> QATModel:
    """Re-prepare ``model`` (the float architecture; its weights are replaced) with the recipe stored in
    ``path`` and load the saved state. ``concrete_args`` must be given again if prepare_qat had them; a recipe
    whose losses distil from the FP model needs that model as ``float_model`` to go on training. The loaded model
    is where ``model`` is, or on ``map_location`` when given (a checkpoint saved on a GPU loads on a CPU-only
    machine, and the other way round).

    Example usage::

        qmodel = fxquant.load("resnet20_w4a4.pt", fxquant.models.resnet20())
        qmodel = fxquant.load("resnet20_w4a4.pt", fxquant.models.resnet20(), map_location="cuda")
    """
    device = resolve_device(map_location, model) if map_location is not None else model_device(model)
    payload = read(path)
    if payload["concrete_args"] and not concrete_args:
        raise CheckpointError(
            f"{path}: the model was prepared with concrete_args {payload['concrete_args']}; pass them to load()"
        )
    try:
        recipe = recipe_from_text(payload["recipe_toml"].encode(), f"{path}: recipe_toml")
    except RecipeError as err:
        raise CheckpointError(str(err)) from None
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
    own = qmodel.state_dict()
    for name, tensor in payload["state_dict"].items():
        if name in own and tensor.dtype != own[name].dtype:
            # load_state_dict would cast silently (int64 weights into float parameters)
            raise CheckpointError(f"{path}: state_dict.{name}: dtype {tensor.dtype}, this model has {own[name].dtype}")
    try:
        qmodel.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the saved state does not fit this model: {_first_line(err, 400)}") from None
    return qmodel.to(device)
