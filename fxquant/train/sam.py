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
        self.last_perturbed_loss: float | None = None
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
        """ε for each tensor: ρ·g/‖g‖, or ASAM's ρ·T²g/‖Tg‖ with T = |value|."""
        if self.config.adaptive:
            scaled = [g * v.abs() for g, v in zip(grads, values)]
            norm = torch.sqrt(sum((s * s).sum() for s in scaled)) + _EPS
            return [self.config.rho * s * v.abs() / norm for s, v in zip(scaled, values)]
        norm = torch.sqrt(sum((g * g).sum() for g in grads)) + _EPS
        return [self.config.rho * g / norm for g in grads]

    def step(self, closure: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
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
        total.backward()
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
                second.backward()
                self.last_perturbed_loss = float(second.detach())
        finally:
            self._mode = "off"
            self._perturbation = {}
            with torch.no_grad():
                for p, e in zip(latents, latent_eps):
                    p.sub_(e)
        return terms
