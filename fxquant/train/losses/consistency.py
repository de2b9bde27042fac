"""CR — consistency regularization for QAT (Pang et al.): the quantized student on one augmented view should
agree with a teacher on another view. Our reading (the paper leaves these open, so each is an option): the teacher
is an EMA of the student (decay 0.999; a mean teacher) or the FP model; agreement is KL on temperature-
softened logits, optionally plus MSE on a tapped feature; the weight ramps up with a sigmoid.

The EMA warms up as the Mean Teacher reference code does: after step t its decay is min(decay, 1 − 1/(t+1)),
so until t ≈ 1/(1 − decay) the teacher is the plain mean of the student's iterates. Without it, a 0.999 teacher
over a short fine-tune (a few hundred steps) stays ≈ the freshly quantized model — at W2A2 a poor one, which
the consistency term then pulls the student back towards.

As in Mean Teacher's code (CuriousAI/mean-teacher), the EMA model runs in train mode: its batch norms normalise
with the teacher's own batch statistics and keep their own running averages, and only parameters are averaged
(``ema_mode = "eval"`` is the earlier form: eval mode, the student's BN statistics copied every step). The
student sees the batch's standard view and the teacher a strongly augmented one unless ``strong_view =
"student"``. The loss's diagnostics report the teacher's and the student's accuracy on their views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.config.sections import ConsistencyConfig

from ..teachers import copy_for_teacher
from .base import AuxLoss, LossInputs
from .kd import kd_loss

_BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class ConsistencyLoss(AuxLoss[ConsistencyConfig]):
    """Recipe ``kind = "consistency"``: student on view 0, teacher on view 1.

    Example usage (own loop)::

        loss = ConsistencyLoss(ConsistencyConfig(teacher="ema", ramp_epochs=2))
    """

    def __init__(self, config: ConsistencyConfig, name: str | None = None):
        super().__init__(config, name)
        self.ema_steps = 0
        self.ema: nn.Module | None = None
        # view 0 is the batch itself, view 1 a strongly augmented copy
        self.student_view, self.teacher_view = (1, 0) if config.strong_view == "student" else (0, 1)
        self.student_views = tuple(sorted({0, self.student_view}))  # view 0 always: the cross-entropy's
        self.teacher_views = (self.teacher_view,)

    def teacher_model(self, student: nn.Module, fp_teacher: nn.Module | None) -> nn.Module | None:
        if self.config.teacher == "fp":
            return fp_teacher
        if self.ema is None:  # created on first use, after the student's quantizers are initialised
            self.ema = copy_for_teacher(student)
        # train mode: the teacher's BN layers use its own batch statistics and update its own running averages
        self.ema.train(self.config.ema_mode == "train")
        return self.ema

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        if self.ema is None:
            return
        self.ema_steps += 1
        decay = self.config.ema_decay
        if self.config.ema_warmup:
            decay = min(decay, 1.0 - 1.0 / (self.ema_steps + 1))
        for ema_p, p in zip(self.ema.parameters(), student.parameters()):
            ema_p.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        own_statistics = self.config.ema_mode == "train"
        for (name, ema_b), b in zip(self.ema.named_buffers(), student.buffers()):
            if own_statistics and name.rsplit(".", 1)[-1] in _BN_STATISTICS:
                continue  # the teacher keeps the running statistics of its own forwards
            ema_b.copy_(b)

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        student = inputs.student[self.student_view]
        teacher = inputs.teachers[(self.config.teacher, self.teacher_view)]
        with torch.no_grad():
            self.diagnostics = {
                "teacher_acc": (teacher.logits.argmax(1) == inputs.y).float().mean(),
                "student_acc": (student.logits.argmax(1) == inputs.y).float().mean(),
            }
        terms = {}
        if self.config.logits:
            terms["kl"] = kd_loss(student.logits, teacher.logits, self.config.T)
        if self.config.tap:
            s_feat, t_feat = student.taps[self.config.tap], teacher.taps[self.config.tap]
            terms["mse"] = self.config.feature_weight * F.mse_loss(s_feat, t_feat)
        return terms
