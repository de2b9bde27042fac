"""FPQ — feature-perturbed quantization (Pang et al.): stochastic feature perturbation (inserted at prepare
time, see :class:`fxquant.taps.FeaturePerturbation`) plus channel-wise standardization distillation (CSD):
each quantized conv's output z, student and FP teacher, standardized per channel over (N, H, W),
z̃ = (z − μ_c)/sqrt(σ_c² + ε), and L_CSD = Σ_layers ‖z̃_teacher − z̃_student‖².

Reduction per layer (``normalize``): ``mean`` over elements (our default: the term's scale no longer grows
with resolution and width, so one weight fits resnet20 and MobileNet alike), ``batch`` (÷ N, a
per-sample reading) or ``sum`` (the paper's plain sum).
"""

from __future__ import annotations

import torch

from fxquant.config.sections import FPQConfig

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


class FPQLoss(AuxLoss[FPQConfig]):
    """Recipe ``kind = "fpq"``: CSD between the student's and the FP teacher's outputs of every op of the
    perturbed type (the perturbation itself is a graph node, inserted at prepare time)."""

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        if not self.config.csd:
            return {}
        tap = self.config.tap_name
        student = inputs.student[0].taps[tap]
        teacher = inputs.teachers[("fp", 0)].taps[tap]
        return {"csd": csd_loss(student, teacher, self.config.normalize, self.config.eps)}
