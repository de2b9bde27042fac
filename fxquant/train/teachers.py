"""Teachers the training side builds: the float (FP) teacher and frozen copies of a student (EMA teachers).

The FP teacher must record the same taps as the student (FPQ distils every conv's output, a consistency loss
may compare a feature), so it is the student's own prepared structure, with the float model's weights and every
quantizer off: a prepared model with its quantizers off computes what the float model computes. A float model
whose architecture differs can still teach logit-only losses (KD, DKD), as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from fxquant.errors import FxQuantError
from fxquant.qat_model import QATModel
from fxquant.quant.controls import quantizers_of

from .devices import model_device


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring gradients; returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def copy_for_teacher(model: nn.Module) -> nn.Module:
    """A frozen deep copy of a (prepared) model, without its float-model reference or recorded taps.

    Example usage::

        ema = copy_for_teacher(qmodel)
    """
    memo: dict[int, object] = {}
    if isinstance(model, QATModel):
        memo[id(model.float_model)] = None  # the reference is dropped, not copied
        model.taps.clear()
    return freeze(copy.deepcopy(model, memo))


def float_teacher(student: QATModel, float_model: nn.Module, tap_readers: Sequence[str] = ()) -> nn.Module:
    """The FP teacher of ``student``: its prepared structure with ``float_model``'s weights, quantizers off, on the
    student's device.

    ``float_model`` may be a plain float model of the student's architecture, or an already prepared model.
    When its weights do not fit the student's architecture, it teaches as it is — unless some loss reads taps
    from the teacher (``tap_readers`` names them), which then needs the same layers (a clear error says so).

    Example usage::

        teacher = float_teacher(qmodel, fp_model)
        teacher(x)       # the float model's logits, and the student's taps recorded in teacher.taps
    """
    if isinstance(float_model, QATModel):
        teacher = float_model
    else:
        teacher = copy_for_teacher(student)
        try:
            teacher.load_float_state_dict(float_model.state_dict())
        except FxQuantError as err:
            if tap_readers:
                raise FxQuantError(
                    f"the teacher's architecture differs from the student's ({err}); the losses "
                    f"{', '.join(tap_readers)} compare the teacher's features layer by layer, so the teacher must be "
                    "the student's float model (same architecture)"
                ) from None
            return freeze(float_model).to(model_device(student))
    for q in quantizers_of(teacher).values():
        q.enabled = False
    return freeze(teacher).to(model_device(student))
