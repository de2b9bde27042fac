"""Sharpness-aware minimization for quantized models (SAQ: Liu, Cai, Zhuang), from recipe ``[optim.sam]``.

One step is two forward/backward passes. The first gives g; the second is taken at a perturbed point and its
gradient is what the optimizer applies; every perturbation is undone before the optimizer step.

* ``perturb = "quantized"`` (SAQ's default): ε = ρ·g/‖g‖ is added to the *quantized* weights Q(w), right after
  each weight quantizer, where g = ∂L/∂Q(w). The second pass's gradient reaches the latent weights through the
  straight-through estimator, and the quantizer steps get theirs too.
* ``perturb = "latent"``: plain SAM on the latent weights w (ε = ρ·g/‖g‖ with g = ∂L/∂w), restored after.
* ``adaptive = true`` (ASAM): ε = ρ·T²g/‖Tg‖ with T = |w| (|Q(w)| in quantized mode), elementwise.
* ``perturb_bn`` / ``perturb_steps``: also perturb batch-norm affine parameters / activation quantizer steps
  (as latent parameters) in the same ascent step. On by default, as SAQ's `include_bn`/`include_aclip`.
* ``update_bn_in_second_pass`` (default true, as SAQ's code): false leaves BN running statistics untouched by the
  second pass.

Example usage::

    [optim.sam]
    rho = 0.05
    perturb = "quantized"
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from fxquant.config.sections import SAMConfig
from fxquant.quant.quantizers import FakeQuantizer

_EPS = 1e-12


def _weight_quantizers(model: nn.Module) -> list[FakeQuantizer]:
    return [m for m in model.modules() if isinstance(m, FakeQuantizer) and m.role == "weight"]


def _extra_latents(model: nn.Module, config: SAMConfig) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for m in model.modules():
        if config.perturb_bn and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            params += [m.weight, m.bias]
        if config.perturb_steps and isinstance(m, FakeQuantizer) and m.role == "activation":
            params += [p for p in m.parameters() if p.requires_grad]
    return params


def _latent_weights(model: nn.Module) -> list[nn.Parameter]:
    """Weights of quantized layers (what the weight quantizers read), for latent-mode SAM."""
    found = []
    for m in model.modules():
        q = getattr(m, "weight_quantizer", None)
        if isinstance(q, FakeQuantizer) and isinstance(getattr(m, "weight", None), nn.Parameter):
            found.append(m.weight)
    if not found:  # functional layers: fall back to every matrix/conv weight
        found = [p for p in model.parameters() if p.dim() > 1 and p.requires_grad]
    return found


@contextmanager
def _frozen_bn_statistics(model: nn.Module, freeze: bool):
    if not freeze:
        yield
        return
    saved = [
        (b, b.clone()) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class SAM:
    """Runs a loss closure twice as SAM prescribes; ``step(closure)`` returns the first pass's loss terms.

    ``closure()`` computes the loss dict (forward); SAM does the backward passes. The caller's optimizer then
    steps on the gradients this leaves in ``.grad`` (those of the perturbed point).

    Example usage::

        sam = SAM(qmodel, SAMConfig(rho=0.05))
        terms = sam.step(lambda: {"ce": F.cross_entropy(qmodel(x), y)})
        optimizer.step()
    """

    def __init__(self, model: nn.Module, config: SAMConfig):
        self.model = model
        self.config = config
        self.quantizers = _weight_quantizers(model)
        self.extra = _extra_latents(model, config)
        self._captured: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._perturbation: dict[int, torch.Tensor] = {}
        self._mode = "off"
        self.last_perturbed_loss: torch.Tensor | None = None  # the second pass's loss, on the device
        self._handles = [q.register_forward_hook(self._hook) for q in self.quantizers]

    def remove(self) -> None:
        """Detach the hooks from the model's weight quantizers."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- the hook on weight quantizers: capture Q(w) and its gradient, or add ε ------------------------
    def _hook(self, module: nn.Module, _inputs, output: torch.Tensor):
        key = id(module)
        if self._mode == "capture" and output.requires_grad:
            self._outputs[key] = output.detach()

            def keep(grad: torch.Tensor, key=key) -> None:
                self._captured[key] = self._captured.get(key, 0) + grad.detach()

            output.register_hook(keep)
        elif self._mode == "perturb" and key in self._perturbation:
            return output + self._perturbation[key]
        return output

    def _scaled(self, grads: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
        """ε for each tensor: ρ·g/‖g‖, or ASAM's ρ·T²g/‖Tg‖ with T = |value|. Invariant to a loss scale (fp16's
        gradient scaler); a non-finite gradient (an fp16 overflow the scaler will skip) gives ε = 0, decided on the
        device without reading it back."""
        scaled = [g * v.abs() for g, v in zip(grads, values)] if self.config.adaptive else grads  # T·g
        norm = torch.sqrt(sum((t.float() * t.float()).sum() for t in scaled)) + _EPS
        factor = torch.where(torch.isfinite(norm), self.config.rho / norm, torch.zeros_like(norm))
        directions = [t * v.abs() for t, v in zip(scaled, values)] if self.config.adaptive else grads  # T²·g
        return [torch.nan_to_num(d * factor, nan=0.0, posinf=0.0, neginf=0.0) for d in directions]

    def step(
        self,
        closure: Callable[[], dict[str, torch.Tensor]],
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    ) -> dict[str, torch.Tensor]:
        """Both passes: ``closure`` computes the loss terms, ``backward(total)`` differentiates them (a gradient
        scaler's ``scaler.scale(total).backward()`` under fp16); returns the first pass's terms."""
        quantized = self.config.perturb == "quantized"
        latents = ([] if quantized else _latent_weights(self.model)) + self.extra
        # pass 1: gradient at the current point
        self._mode = "capture" if quantized else "off"
        self._captured.clear()
        self._outputs.clear()
        terms = closure()
        total = sum(terms.values())
        for p in self.model.parameters():
            p.grad = None
        backward(total)
        self._mode = "off"
        keys = [k for k in self._captured if k in self._outputs] if quantized else []
        grads = [self._captured[k] for k in keys] + [
            p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in latents
        ]
        values = [self._outputs[k] for k in keys] + [p.detach() for p in latents]
        eps = self._scaled(grads, values) if grads else []
        self._perturbation = dict(zip(keys, eps[: len(keys)]))
        latent_eps = eps[len(keys) :]
        # pass 2: gradient at the perturbed point, then undo every perturbation
        with torch.no_grad():
            for p, e in zip(latents, latent_eps):
                p.add_(e)
        for p in self.model.parameters():
            p.grad = None
        self._mode = "perturb"
        try:
            with _frozen_bn_statistics(self.model, not self.config.update_bn_in_second_pass):
                second = sum(closure().values())
                backward(second)
                self.last_perturbed_loss = second.detach()
        finally:
            self._mode = "off"
            self._perturbation = {}
            with torch.no_grad():
                for p, e in zip(latents, latent_eps):
                    p.sub_(e)
        return terms
