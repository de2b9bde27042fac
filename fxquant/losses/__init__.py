"""Auxiliary losses a recipe declares with ``[[loss]]``, each one class selected by ``kind``.

``kd`` and ``dkd`` (logit distillation), ``consistency`` (CR), ``fpq`` (FPQ's channel-wise standardization
distillation; its perturbation is inserted at prepare time), ``mec`` (MEC-Quant). The training step runs the
views and teachers they ask for; they can also be used on their own (every formula is a plain function).

Example usage (own loop)::

    from fxquant.losses import dkd_terms, mec_loss
    tckd, nckd = dkd_terms(student_logits, teacher_logits, y)
"""

from __future__ import annotations

from fxquant.errors import RecipeError, closest
from fxquant.recipe import Recipe
from fxquant.taps import parse_selector

from .base import AuxLoss, Forward, LossInputs, sigmoid_rampup
from .consistency import ConsistencyLoss, copy_for_teacher
from .fpq import FPQLoss, channel_standardize, csd_loss
from .fpq import tap_name as fpq_tap_name
from .kd import DKDLoss, KDLoss, dkd_terms, kd_loss
from .mec import MECLoss, mec_loss, mec_moe_loss

LOSS_CLASSES: dict[str, type[AuxLoss]] = {
    "kd": KDLoss,
    "dkd": DKDLoss,
    "consistency": ConsistencyLoss,
    "fpq": FPQLoss,
    "mec": MECLoss,
}
_DEFAULT_TAP = {"mec": "penultimate"}


def feature_plan(recipe: Recipe) -> tuple[dict[str, str], tuple[float, str] | None]:
    """(tap name → selector, FPQ perturbation (p, op type) or None) for a recipe: its ``[taps]`` plus the taps
    its losses need. A loss's ``tap`` is a declared tap name or a selector; anything else is a RecipeError.

    Example usage::

        selectors, perturb = feature_plan(fxquant.load_recipe("fpq_w4a4"))
    """
    selectors = dict(recipe.taps)
    perturb = None
    for i, config in enumerate(recipe.losses):
        kind = config["kind"]
        tap = config.get("tap", _DEFAULT_TAP.get(kind))
        if tap is not None and tap not in selectors:
            try:
                parse_selector(tap)
            except ValueError:
                declared = ", ".join(sorted(selectors)) or "none"
                raise RecipeError(
                    recipe.source,
                    f"loss[{i}].tap",
                    f"no tap named {tap!r} (declared taps: {declared}) and not a selector",
                    closest(tap, selectors),
                ) from None
            selectors[tap] = tap
        if kind == "fpq":
            layers = config.get("layers", "Conv2d")
            if config.get("csd", True):
                selectors[fpq_tap_name(config)] = f"type:{layers}"
            if float(config.get("p", 0.1)) > 0:
                perturb = (float(config.get("p", 0.1)), layers)
    return selectors, perturb


def build_losses(recipe: Recipe) -> list[AuxLoss]:
    """The loss objects of a recipe's ``[[loss]]`` list, named by kind (suffixed when a kind repeats)."""
    counts: dict[str, int] = {}
    losses = []
    for config in recipe.losses:
        kind = config["kind"]
        counts[kind] = counts.get(kind, 0) + 1
        name = kind if counts[kind] == 1 else f"{kind}{counts[kind]}"
        losses.append(LOSS_CLASSES[kind](config, name))
    return losses


__all__ = [
    "LOSS_CLASSES",
    "AuxLoss",
    "ConsistencyLoss",
    "DKDLoss",
    "FPQLoss",
    "Forward",
    "KDLoss",
    "LossInputs",
    "MECLoss",
    "build_losses",
    "channel_standardize",
    "copy_for_teacher",
    "csd_loss",
    "dkd_terms",
    "feature_plan",
    "kd_loss",
    "mec_loss",
    "mec_moe_loss",
    "sigmoid_rampup",
]
