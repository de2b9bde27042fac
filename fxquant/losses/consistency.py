"""CR — consistency regularization for QAT (Pang et al.): the quantized student on one augmented view should
agree with a teacher on another view. Our reading (the paper leaves these open; see METHODS.md): the teacher
is an EMA of the student (decay 0.999; a mean teacher) or the FP model; agreement is KL on temperature-
softened logits, optionally plus MSE on a tapped feature; the weight ramps up with a sigmoid.

The EMA warms up as the Mean Teacher reference code does: after step t its decay is min(decay, 1 − 1/(t+1)),
so until t ≈ 1/(1 − decay) the teacher is the plain mean of the student's iterates. Without it, a 0.999 teacher
over a short fine-tune (a few hundred steps) stays ≈ the freshly quantized model — at W2A2 a poor one, which
the consistency term then pulls the student back towards.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .base import AuxLoss, LossInputs
from .kd import kd_loss


def copy_for_teacher(model: nn.Module) -> nn.Module:
    """A frozen deep copy of a prepared model, without its own teacher, losses or recorded taps."""
    held = {key: model.__dict__.pop(key) for key in ("teacher", "losses") if key in model.__dict__}
    taps = getattr(model, "taps", None)
    if taps is not None:
        taps.clear()
    try:
        twin = copy.deepcopy(model)
    finally:
        model.__dict__.update(held)
    twin.eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class ConsistencyLoss(AuxLoss):
    """Recipe ``kind = "consistency"``: student on view 0, teacher on view 1.

    Example usage (own loop)::

        loss = ConsistencyLoss({"teacher": "ema", "ramp_epochs": 2})
    """

    kind = "consistency"
    student_views = (0,)
    teacher_views = (1,)

    def __init__(self, config, name=None):
        super().__init__(config, name)
        self.teacher_kind = config.get("teacher", "ema")
        self.decay = float(config.get("ema_decay", 0.999))
        self.ema_warmup = bool(config.get("ema_warmup", True))
        self.ema_steps = 0
        self.T = float(config.get("T", 1.0))
        self.use_logits = bool(config.get("logits", True))
        self.tap = config.get("tap")
        self.feature_weight = float(config.get("feature_weight", 1.0))
        self.ema: nn.Module | None = None

    def teacher_model(self, student: nn.Module, fp_teacher: nn.Module | None) -> nn.Module | None:
        if self.teacher_kind == "fp":
            return fp_teacher
        if self.ema is None:  # created on first use, after the student's quantizers are initialised
            self.ema = copy_for_teacher(student)
        return self.ema

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        if self.ema is None:
            return
        self.ema_steps += 1
        decay = min(self.decay, 1.0 - 1.0 / (self.ema_steps + 1)) if self.ema_warmup else self.decay
        for ema_p, p in zip(self.ema.parameters(), student.parameters()):
            ema_p.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        for ema_b, b in zip(self.ema.buffers(), student.buffers()):
            ema_b.copy_(b)

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student = inputs.student[0]
        teacher = inputs.teachers[(self.teacher_kind, 1)]
        terms = {}
        if self.use_logits:
            terms["kl"] = kd_loss(student.logits, teacher.logits, self.T)
        if self.tap:
            s_feat, t_feat = student.taps[self.tap], teacher.taps[self.tap]
            terms["mse"] = self.feature_weight * F.mse_loss(s_feat, t_feat)
        return terms
