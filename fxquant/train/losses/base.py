"""What every auxiliary loss shares: its weight and ramp-up, the views and teachers it needs, and the inputs
the training step hands it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.config.sections import LossConfig

C = TypeVar("C", bound=LossConfig)


def sigmoid_rampup(progress: float, length: float) -> float:
    """exp(−5(1 − t)²) for t = progress/length < 1, then 1 (Laine & Aila's ramp, used by mean teachers).

    Example usage::

        sigmoid_rampup(0.5, 2.0)    # 0.0601 — a quarter of the way
    """
    if length <= 0 or progress >= length:
        return 1.0
    t = max(progress, 0.0) / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


def feature_gradient_ratio(term: torch.Tensor, inputs: LossInputs, feature: torch.Tensor) -> torch.Tensor:
    """‖∂term/∂f‖ / ‖∂CE/∂f‖ at the features ``f`` the term reads (view 0's cross-entropy): how strongly an
    auxiliary term pulls compared with the task loss, as a 0-dim tensor on the features' device. NaN when there is
    no gradient to compare (no grad mode).

    The student's views run as one batch and each view's features are a slice of it, so both gradients are
    taken at that joint tensor (the slice's base), where the cross-entropy's gradient path also passes.
    """
    at = feature._base if feature._base is not None else feature
    logits = inputs.student[0].logits
    nan = feature.new_tensor(float("nan"), dtype=torch.float32)
    if not (term.requires_grad and at.requires_grad and logits.requires_grad):
        return nan
    ce = F.cross_entropy(logits, inputs.y)
    (own,) = torch.autograd.grad(term, at, retain_graph=True, allow_unused=True)
    (task,) = torch.autograd.grad(ce, at, retain_graph=True, allow_unused=True)
    if own is None or task is None:
        return nan
    return (own.float().norm() / task.float().norm().clamp_min(1e-12)).detach()


@dataclass
class Forward:
    """One model's outputs on one view: logits and a snapshot of its tap store."""

    logits: torch.Tensor
    taps: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossInputs:
    """What a loss reads: labels, the student's forwards by view, teachers' forwards by (teacher, view), and
    training progress in epochs."""

    y: torch.Tensor
    student: dict[int, Forward]
    teachers: dict[tuple[str, int], Forward]
    progress: float = 0.0
    total: float = 1.0  # the run's length in epochs (warm-ups given as a fraction of the run use it)


class AuxLoss(Generic[C]):
    """Base class: ``compute`` returns unweighted terms; calling the loss applies weight × ramp-up.

    ``config`` is the loss's typed recipe table; it says which teacher the loss needs (``teacher_kind``:
    ``"fp"``, ``"ema"`` or None). Subclasses declare on which views the student and the teacher run (view 0
    is the batch itself, view 1 a second augmentation of it).
    """

    student_views: tuple[int, ...] = (0,)
    teacher_views: tuple[int, ...] = (0,)

    def __init__(self, config: C, name: str | None = None):
        self.config = config
        self.name = name or config.kind
        # numbers about the last step that are not loss terms (a teacher's accuracy, a gradient ratio), as 0-dim
        # tensors on the device; the training step reports them as ``<name>.<key>`` metrics
        self.diagnostics: dict[str, torch.Tensor] = {}

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def teacher_kind(self) -> str | None:
        return self.config.teacher_kind

    def weight_at(self, progress: float) -> float:
        return self.config.weight * sigmoid_rampup(progress, self.config.ramp_epochs)

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        scale = self.weight_at(inputs.progress)
        return {
            f"{self.name}.{key}" if key else self.name: value * scale for key, value in self.compute(inputs).items()
        }

    def teacher_model(self, student: nn.Module, fp_teacher: nn.Module | None) -> nn.Module | None:
        """The model to run as this loss's teacher (the FP teacher unless a subclass keeps its own)."""
        return fp_teacher if self.teacher_kind == "fp" else None

    def parameters(self) -> list[nn.Parameter]:
        """Parameters the loss itself learns (a gate's); :class:`fxquant.TrainStep` adds them to the optimizer."""
        return []

    def to(self, device: torch.device) -> AuxLoss:
        """Move what the loss learns to ``device`` (the student's)."""
        return self

    def after_step(self, student: nn.Module) -> None:
        """Called after each optimizer step (EMA teachers update here)."""
