"""What every auxiliary loss shares: its weight and ramp-up, the views and teachers it needs, and the inputs
the training step hands it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
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

    def after_step(self, student: nn.Module) -> None:
        """Called after each optimizer step (EMA teachers update here)."""
