"""Auxiliary losses a recipe declares with ``[[loss]]``, one class per ``kind``, built from its typed table.

``kd`` and ``dkd`` (logit distillation), ``consistency`` (CR), ``fpq`` (FPQ's channel-wise standardization
distillation; its perturbation is inserted at prepare time), ``mec`` (MEC-Quant). The training step runs the
views and teachers they ask for; they can also be used on their own (every formula is a plain function).

Example usage (own loop)::

    from fxquant.train.losses import dkd_terms, mec_loss
    tckd, nckd = dkd_terms(student_logits, teacher_logits, y)
"""

from __future__ import annotations

from collections.abc import Iterable

from fxquant.config.sections import ConsistencyConfig, DKDConfig, FPQConfig, KDConfig, LossConfig, MECConfig

from .base import AuxLoss, Forward, LossInputs, sigmoid_rampup
from .consistency import ConsistencyLoss
from .fpq import FPQLoss, channel_standardize, csd_loss
from .kd import DKDLoss, KDLoss, dkd_terms, kd_loss
from .mec import MECLoss, mec_loss, mec_moe_loss

LOSS_CLASSES: dict[type[LossConfig], type[AuxLoss]] = {
    KDConfig: KDLoss,
    DKDConfig: DKDLoss,
    ConsistencyConfig: ConsistencyLoss,
    FPQConfig: FPQLoss,
    MECConfig: MECLoss,
}


def build_losses(configs: Iterable[LossConfig]) -> list[AuxLoss]:
    """The loss objects of a recipe's ``[[loss]]`` tables, named by kind (suffixed when a kind repeats).

    Example usage::

        losses = build_losses(qmodel.recipe.losses)
    """
    counts: dict[str, int] = {}
    losses = []
    for config in configs:
        counts[config.kind] = counts.get(config.kind, 0) + 1
        name = config.kind if counts[config.kind] == 1 else f"{config.kind}{counts[config.kind]}"
        losses.append(LOSS_CLASSES[type(config)](config, name))
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
    "csd_loss",
    "dkd_terms",
    "kd_loss",
    "mec_loss",
    "mec_moe_loss",
    "sigmoid_rampup",
]
