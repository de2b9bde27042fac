"""Runtime pieces the tap passes insert: feature taps (record a tensor, change nothing) and FPQ's stochastic
feature perturbation.

A :class:`TapStore` is a dict from tap name to the latest tensor (or, for selectors that match many layers
such as ``type:Conv2d``, to a dict from layer name to tensor). :class:`Tap` nodes sit on a side branch of the
graph (no users), so they cannot change what the model computes; the recorded tensors keep their autograd
history, so a loss on them trains the model. The training step clears the store before each forward.

Example usage (your own loop)::

    qmodel = fxquant.prepare_qat(model, {"extends": "lsq_w4a4", "taps": {"feat": "penultimate"}})
    qmodel.taps.clear()
    logits = qmodel(x)
    feature = qmodel.taps["feat"]          # the classifier's input for this batch
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant.quant.quantizers import FakeQuantizer

SELECTOR_KINDS = ("penultimate", "output", "module", "input", "type")


def parse_selector(selector: str) -> tuple[str, str]:
    """("kind", "argument") of a tap selector; raises ValueError naming the valid forms.

    Example usage::

        parse_selector("type:Conv2d")     # ("type", "Conv2d")
    """
    kind, _, arg = selector.partition(":")
    if kind not in SELECTOR_KINDS or (kind in ("module", "input", "type")) != bool(arg):
        raise ValueError(
            f"bad tap selector {selector!r}; use penultimate, output, module:NAME, input:NAME or type:TYPE"
        )
    return kind, arg


class TapStore(dict):
    """Tap name → latest tensor, or → {layer name: tensor} for multi-layer selectors."""

    def record(self, name: str, key: str | None, value: torch.Tensor) -> None:
        if key is None:
            self[name] = value
        else:
            self.setdefault(name, {})[key] = value


class Tap(nn.Module):
    """Records its input into the store under ``name`` (and ``key``); returns it unchanged."""

    def __init__(self, store: TapStore, name: str, key: str | None = None):
        super().__init__()
        self.store = store
        self.name = name
        self.key = key
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self.store.record(self.name, self.key, x)
        return x

    def extra_repr(self) -> str:
        return f"{self.name!r}" + (f", key={self.key!r}" if self.key else "")


class FeaturePerturbation(nn.Module):
    """FPQ's stochastic feature perturbation on a quantized layer's input: in training, with probability
    ``p`` per forward, x + δ with δ ~ U[−s/2, s/2] per element, s the step of the activation quantizer that
    produced x (per tensor, or per channel along axis 1). Identity in eval mode, when disabled, or while that
    quantizer is off or not yet initialised.

    Example usage::

        perturb = FeaturePerturbation(p=0.1, quantizer=act_quantizer)
    """

    def __init__(self, p: float, quantizer: FakeQuantizer, generator: torch.Generator | None = None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"perturbation probability must be in [0, 1], got {p}")
        self.p = p
        self.enabled = True
        self.generator = generator
        # A reference, not a child: the quantizer already belongs to the graph (no duplicate state_dict keys).
        object.__setattr__(self, "quantizer", quantizer)
        self.applied = 0  # how many forwards were perturbed (for tests and reports)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        if not (self.training and self.enabled and self.p > 0 and q.is_active and q.is_initialized):
            return x
        self.calls += 1
        draw_on = self.generator.device if self.generator is not None else "cpu"  # a host-side coin
        if float(torch.rand((), generator=self.generator, device=draw_on)) >= self.p:
            return x
        self.applied += 1
        step = q.scale.detach()
        if step.numel() > 1 and x.dim() > 1:  # per-channel activation steps: broadcast along the channels
            step = step.reshape(1, -1, *([1] * (x.dim() - 2)))
        # drawn where the generator lives (a seeded CPU generator for a CUDA batch: then copied over)
        device = self.generator.device if self.generator is not None else x.device
        noise = torch.rand(x.shape, dtype=x.dtype, device=device, generator=self.generator).to(x.device).sub_(0.5)
        return x + noise * step.to(x.dtype)  # in x's dtype: a bf16 activation stays bf16

    def extra_repr(self) -> str:
        return f"p={self.p}, enabled={self.enabled}"
