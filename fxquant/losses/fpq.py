"""FPQ — feature-perturbed quantization (Pang et al.): stochastic feature perturbation (inserted at prepare
time, see :class:`fxquant.taps.FeaturePerturbation`) plus channel-wise standardization distillation (CSD):
each quantized conv's output z, student and FP teacher, standardized per channel over (N, H, W),
z̃ = (z − μ_c)/sqrt(σ_c² + ε), and L_CSD = Σ_layers ‖z̃_teacher − z̃_student‖².

Reduction per layer (``normalize``): ``mean`` over elements (our default: the term's scale no longer grows
with resolution and width, so one weight fits resnet20 and MobileNet alike), ``batch`` (÷ N, METHODS.md's
reading) or ``sum`` (the paper's plain sum).
"""

from __future__ import annotations

import torch

from .base import AuxLoss, LossInputs


def channel_standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(z − mean)/sqrt(var + eps) per channel (axis 1), statistics over every other axis (biased variance).

    Example usage::

        channel_standardize(torch.randn(8, 16, 4, 4)).mean((0, 2, 3))   # ≈ 0 per channel
    """
    dims = [d for d in range(z.dim()) if d != 1]
    mean = z.mean(dims, keepdim=True)
    var = z.var(dims, keepdim=True, unbiased=False)
    return (z - mean) / torch.sqrt(var + eps)


def csd_loss(
    student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], normalize: str = "mean", eps: float = 1e-5
) -> torch.Tensor:
    """Σ over layers of the reduced squared difference of channel-standardized features, paired by name.

    Example usage::

        loss = csd_loss(qmodel_taps["convs"], teacher_taps["convs"])
    """
    if set(student) != set(teacher):
        raise KeyError(f"student and teacher features differ: {sorted(set(student) ^ set(teacher))[:5]}")
    total = None
    for name, z_s in student.items():
        diff = (channel_standardize(teacher[name].detach(), eps) - channel_standardize(z_s, eps)).square()
        if normalize == "mean":
            term = diff.mean()
        elif normalize == "batch":
            term = diff.sum() / z_s.shape[0]
        else:
            term = diff.sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no features to distill")
    return total


class FPQLoss(AuxLoss):
    """Recipe ``kind = "fpq"``: ``p`` (perturbation probability, 0.1), ``layers`` (op type, Conv2d), ``csd``
    (true), ``normalize`` (mean | batch | sum), ``eps``."""

    kind = "fpq"
    teacher_kind = "fp"

    def __init__(self, config, name=None):
        super().__init__(config, name)
        self.tap = tap_name(config)
        self.use_csd = bool(config.get("csd", True))
        if not self.use_csd:
            self.teacher_kind = None

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        if not self.use_csd:
            return {}
        student = inputs.student[0].taps[self.tap]
        teacher = inputs.teachers[("fp", 0)].taps[self.tap]
        normalize = self.config.get("normalize", "mean")
        return {"csd": csd_loss(student, teacher, normalize, float(self.config.get("eps", 1e-5)))}


def tap_name(config: dict) -> str:
    """The tap FPQ distils: the outputs of every op of the perturbed type."""
    return f"fpq:{config.get('layers', 'Conv2d')}"
