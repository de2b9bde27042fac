"""Logit distillation: temperature KD (Hinton et al. 2015) and decoupled KD (Zhao et al., CVPR 2022).

DKD splits KD into a target-class term (TCKD: KL between the binary distributions [p_gt, 1 − p_gt]) and a
non-target term (NCKD: KL between the distributions over the other classes), weighted separately:
KD = TCKD + (1 − p_gt^teacher)·NCKD, and DKD = α·TCKD + β·NCKD, both times T².
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxquant.config.sections import DKDConfig, KDConfig

from .base import AuxLoss, LossInputs


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T))·T², averaged over the batch.

    Example usage::

        loss = kd_loss(student(x), teacher(x).detach(), T=4.0)
    """
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, T: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each averaged over the batch and multiplied by T².

    Example usage::

        tckd, nckd = dkd_terms(student(x), teacher(x).detach(), y)
    """
    gt = F.one_hot(target, student_logits.shape[1]).bool()
    p_s = F.softmax(student_logits / T, dim=1)
    p_t = F.softmax(teacher_logits / T, dim=1)
    binary_s = torch.stack([p_s[gt], (p_s * ~gt).sum(1)], dim=1).clamp_min(1e-12)
    binary_t = torch.stack([p_t[gt], (p_t * ~gt).sum(1)], dim=1).clamp_min(1e-12)
    tckd = (binary_t * (binary_t.log() - binary_s.log())).sum(1).mean()
    # Non-target distributions: the target logit pushed to −∞ (a large finite shift keeps gradients finite).
    masked_s = student_logits / T - 1000.0 * gt
    masked_t = teacher_logits / T - 1000.0 * gt
    nckd = F.kl_div(F.log_softmax(masked_s, 1), F.log_softmax(masked_t, 1), reduction="batchmean", log_target=True)
    return tckd * T * T, nckd * T * T


class KDLoss(AuxLoss[KDConfig]):
    """Recipe ``kind = "kd"``: KD from the FP teacher on the same batch."""

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        teacher = inputs.teachers[("fp", 0)].logits
        return {"": kd_loss(inputs.student[0].logits, teacher, self.config.T)}


class DKDLoss(AuxLoss[DKDConfig]):
    """Recipe ``kind = "dkd"``: α·TCKD + β·NCKD from the FP teacher."""

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        teacher = inputs.teachers[("fp", 0)].logits
        tckd, nckd = dkd_terms(inputs.student[0].logits, teacher, inputs.y, self.config.T)
        return {"tckd": self.config.alpha * tckd, "nckd": self.config.beta * nckd}
