"""What the generator optimises: an additive angular margin on the FP model's features (AMA) and BN-statistics
matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ama_logits(features: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, margin: float, scale: float):
    """s·cos(θ_j + m·[j = y]) with cos θ_j between normalised features and class centres (rows of ``weight``).

    Example usage::

        loss = F.cross_entropy(ama_logits(penultimate, fc.weight, y, 0.3, 16.0), y)
    """
    cosine = F.normalize(features, dim=1) @ F.normalize(weight, dim=1).T
    theta = torch.acos(cosine.clamp(-1 + 1e-6, 1 - 1e-6))
    target = F.one_hot(y, weight.shape[0]).bool()
    return scale * torch.where(target, torch.cos(theta + margin), cosine)


class BNStatistics:
    """Forward hooks on every batch norm of a model: Σ_l (‖μ_l − μ_l^run‖² + ‖σ²_l − σ²_l^run‖²)/L of the
    batch entering each BN (what the generator matches). Use as a context manager around forwards."""

    def __init__(self, model: nn.Module):
        self.layers = [
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        self.terms: list[torch.Tensor] = []
        self.handles: list = []

    def __enter__(self) -> BNStatistics:
        self.terms.clear()
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, module: nn.Module, inputs: tuple, _output) -> None:
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.terms.append((mean - module.running_mean).square().sum() + (var - module.running_var).square().sum())

    def loss(self) -> torch.Tensor:
        if not self.terms:
            raise ValueError("no batch-norm layer saw this forward: BN-statistics matching needs BN layers")
        return torch.stack(self.terms).mean()


def classifier(model: nn.Module) -> nn.Linear:
    """The model's last linear layer: its rows are the class centres AMA measures angles to."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("AMA needs the model's last linear layer (its rows are the class centres)")
    return linears[-1]
