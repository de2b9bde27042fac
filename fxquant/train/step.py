"""TrainStep: one optimisation step per call — the views, forwards, teachers and losses a recipe declares,
SAM's two passes when the recipe has ``[optim.sam]``, and the optimizer step.

Ownership: the step builds the recipe's loss objects and the teacher they need. The FP teacher comes from the
float model (``teacher=`` here, else ``qmodel.float_model``) with the student's own prepared structure, so that
it records the same taps (:func:`fxquant.train.teachers.float_teacher`); EMA teachers belong to their loss.

Devices and precision: the step runs where the model is. It moves each batch there, puts the teacher and the
losses' own parameters there, runs the forwards under the autocast of its ``precision`` (bf16, fp16) and, for
fp16, scales the loss with a gradient scaler. Nothing in a step reads a device tensor on the host: the metrics it
returns are detached 0-dim tensors on the model's device (``float(m["loss"])`` when a number is needed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from fxquant.errors import FxQuantError
from fxquant.qat_model import QATModel
from fxquant.quant.controls import clamp_steps

from . import distributed
from .augment import augment_batch
from .devices import DeviceError, Precision, autocast_without_scaling, model_device, to_device
from .losses import AuxLoss, Forward, LossInputs, build_losses
from .sam import SAM
from .teachers import float_teacher, freeze


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DistributedDataParallel's wrappers (or the model itself)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_teacher(student: nn.Module, float_model: nn.Module | None, losses: Iterable[AuxLoss]) -> nn.Module | None:
    """The FP teacher ``losses`` need (None when none of them distils from the float model), on the student's
    device.

    Example usage::

        teacher = build_teacher(qmodel, fp_model, build_losses(qmodel.recipe.losses))
    """
    readers = [loss for loss in losses if loss.teacher_kind == "fp"]
    if not readers:
        return None
    if float_model is None:
        raise FxQuantError(
            f"the losses {', '.join(loss.name for loss in readers)} distil from the float model, but there is none: "
            "pass TrainStep(..., teacher=float_model), or prepare_qat(..., float_model=float_model)"
        )
    if not isinstance(student, QATModel):
        return freeze(float_model).to(model_device(student))
    return float_teacher(student, float_model, [loss.name for loss in readers if loss.config.taps()])


class TrainStep:
    """One optimisation step per call: the views, forwards and losses the model's recipe declares, backward,
    optimizer step. Returns a dict of metrics (one per loss term, plus ``loss`` and ``acc``) as detached 0-dim
    tensors on the model's device: reading one as a number (``float``) waits for the step to finish on a GPU.

    ``losses`` (default: built from the model's recipe) are the auxiliary losses; ``teacher`` is the float model
    they distil from (default ``qmodel.float_model``; a plain float model of the student's architecture, or a
    prepared one; it is frozen); ``extra_losses`` are callables ``(step, x, y, logits) -> dict``
    added to the loss. A batch is ``(x, y)`` or ``(x, x2, y)``: when a loss needs a second view and the batch
    has none, it is made from ``x`` with :func:`fxquant.data.augment_batch` (strong augmentation).
    ``progress`` (fractional epochs, set by ``fit``) drives ramp-ups. ``precision`` is ``"fp32"``, ``"bf16"``
    or ``"fp16"`` (autocast; fp16 with a gradient scaler). Batches are moved to the model's device.

    Example usage::

        step = fxquant.TrainStep(qmodel.cuda(), optimizer, precision="bf16")
        for x, y in loader:
            metrics = step(x, y)      # {"ce": ..., "fpq.csd": ..., "loss": ..., "acc": ...}
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        teacher: nn.Module | None = None,
        losses: Iterable[AuxLoss] | None = None,
        extra_losses: Iterable[Callable[..., dict[str, torch.Tensor]]] = (),
        ce_weight: float = 1.0,
        precision: str | Precision = "fp32",
    ):
        self.model = model
        self.student = unwrap(model)
        device = model_device(self.student)  # also refuses a model split across devices
        self.precision = precision if isinstance(precision, Precision) else Precision.of(precision, device)
        self.scaler = self.precision.scaler()
        # a parameter to read the model's device from on each call (it follows model.to(...))
        self._probe = next(self.student.parameters(), None)
        self.optimizer = optimizer
        self.criterion = criterion or nn.CrossEntropyLoss()
        recipe = self.student.recipe if isinstance(self.student, QATModel) else None
        if losses is None:
            with torch.device(device):  # a loss's own modules (a gate) are built where the model is
                losses = build_losses(recipe.losses) if recipe is not None else []
        self.losses = list(losses)
        self.loss_parameters = self._adopt_loss_parameters(device)
        float_model = teacher if teacher is not None else getattr(self.student, "float_model", None)
        self.teacher = build_teacher(self.student, float_model, self.losses)
        self.extra_losses = list(extra_losses)
        self.ce_weight = ce_weight  # 0: labels never enter the loss (KD-only training, as ACS's authors train)
        if ce_weight == 0 and not self.losses and not self.extra_losses:
            raise FxQuantError("ce_weight = 0 and no [[loss]]: nothing to train on (add a kd loss for KD-only)")
        self.progress = 0.0
        self.total_epochs = 1.0  # the run's length (fit sets it): warm-ups given as a fraction of the run
        self.views = 1 + max((v for loss in self.losses for v in (*loss.student_views, *loss.teacher_views)), default=0)
        self.sam = SAM(self.student, recipe.sam) if recipe is not None and recipe.sam is not None else None

    def _adopt_loss_parameters(self, device: torch.device) -> list[nn.Parameter]:
        """Parameters the losses learn (a gate's): on the student's device, in the optimizer as a group of their
        own (the first group's learning rate, no weight decay) unless the optimizer already holds them."""
        parameters = [p for loss in self.losses for p in loss.to(device).parameters()]
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        fresh = [p for p in parameters if id(p) not in held]
        if fresh:
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.add_param_group({"params": fresh, "lr": lr, "weight_decay": 0.0, "name": "losses"})
        return parameters

    def _average_loss_gradients(self) -> None:
        # DDP averages the model's gradients; the losses' own parameters live outside it
        if not (self.loss_parameters and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for p in self.loss_parameters:
            if p.grad is not None:
                p.grad.div_(torch.distributed.get_world_size())
                distributed.all_reduce(p.grad)

    def _forward(self, model: nn.Module, x: torch.Tensor) -> Forward:
        store = getattr(unwrap(model), "taps", None)
        if store is not None:
            store.clear()
        logits = model(x)
        return Forward(logits, dict(store) if store is not None else {})

    def _student_forwards(self, views: list[torch.Tensor], which: list[int]) -> dict[int, Forward]:
        # Several views go through the student as one batch: one forward per backward (what DDP requires),
        # and one larger batch is faster than two.
        batch = views[which[0]] if len(which) == 1 else torch.cat([views[v] for v in which])  # no copy for one view
        joint = self._forward(self.model, batch)
        return dict(zip(which, _split(joint, len(which))))

    @property
    def device(self) -> torch.device:
        """The device the model, and so each step, is on."""
        return self._probe.device if self._probe is not None else torch.device("cpu")

    def _backward(self, total: torch.Tensor) -> None:
        (total if self.scaler is None else self.scaler.scale(total)).backward()

    def __call__(self, *batch: torch.Tensor) -> dict[str, torch.Tensor]:
        device = self.device
        if self.precision.name != "fp16" and autocast_without_scaling(device):
            raise DeviceError(
                "TrainStep runs under an fp16 autocast set outside it, without a gradient scaler: small gradients "
                "(the quantizer steps') underflow to zero. Pass precision='fp16' (the step then autocasts and "
                "scales the loss itself) instead of wrapping it in torch.autocast"
            )
        *views, y = to_device(batch, device)
        while len(views) < self.views:
            views.append(augment_batch(views[0], "strong"))
        self.model.train()
        student_views = sorted({0, *(v for loss in self.losses for v in loss.student_views)})
        teachers: dict[tuple[str, int], Forward] = {}
        first_logits: list[torch.Tensor] = []

        def loss_terms() -> dict[str, torch.Tensor]:
            """Student forward(s) and every loss term; SAM calls it twice, at w and at the perturbed point."""
            forwards = self._student_forwards(views, student_views)
            out = forwards[0].logits
            if not first_logits:  # teachers run once per step, after the student (an EMA copy needs its init)
                first_logits.append(out)
                with torch.no_grad():
                    for loss in self.losses:
                        model = loss.teacher_model(self.student, self.teacher)
                        for v in loss.teacher_views if model is not None else ():
                            if (loss.teacher_kind, v) not in teachers:
                                teachers[(loss.teacher_kind, v)] = self._forward(model, views[v])
            terms = {"ce": self.ce_weight * self.criterion(out, y)} if self.ce_weight else {}
            inputs = LossInputs(y, forwards, teachers, self.progress, self.total_epochs)
            for loss in self.losses:
                terms.update(loss(inputs))
            for extra in self.extra_losses:
                terms.update(extra(self, views[0], y, out))
            return terms

        def forward_and_losses() -> dict[str, torch.Tensor]:
            with self.precision.autocast():
                return loss_terms()

        self.optimizer.zero_grad(set_to_none=True)
        if self.sam is None:
            terms = forward_and_losses()
            total = sum(terms.values())
            self._backward(total)
        else:  # SAM: two forward/backward passes; .grad holds the perturbed point's gradient
            terms = self.sam.step(forward_and_losses, self._backward)
            total = sum(terms.values())
        self._average_loss_gradients()
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        clamp_steps(self.student)
        logits = first_logits[0]
        for loss in self.losses:
            loss.after_step(self.student)
        if getattr(self.student, "taps", None) is not None:
            self.student.taps.clear()  # drop references to this step's activations
        metrics = {name: value.detach().float() for name, value in terms.items()}
        metrics["loss"] = total.detach().float()
        metrics["acc"] = (logits.detach().argmax(1) == y).float().mean()
        for loss in self.losses:
            metrics.update({f"{loss.name}.{key}": value for key, value in loss.diagnostics.items()})
        return metrics


def _split(forward: Forward, parts: int) -> list[Forward]:
    """A forward on concatenated views, split back per view (logits and every batch-shaped tap)."""
    if parts == 1:
        return [forward]

    def chunk(value):
        if isinstance(value, dict):
            pieces = {k: chunk(v) for k, v in value.items()}
            return [{k: pieces[k][i] for k in pieces} for i in range(parts)]
        return list(value.chunk(parts))

    logits = chunk(forward.logits)
    taps = {name: chunk(value) for name, value in forward.taps.items()}
    return [Forward(logits[i], {name: taps[name][i] for name in taps}) for i in range(parts)]
