"""How much each layer's loss cares about its weights: Hutchinson's Hessian trace, a per-layer SAM step, and
the quantization error ‖Q_b(w) − w‖² that turns a sensitivity into the perturbation term Ω_i(b).

Both measures look at the float loss (quantizers off, eval mode) on calibration batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch import nn

from fxquant.quant.controls import disable_quant
from fxquant.quant.kernel import fake_quantize
from fxquant.quant.quantizers import integer_range

from .budget import LayerInfo


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())


def _loss(model: nn.Module, batches: Iterable) -> torch.Tensor:
    total, count = 0.0, 0
    for x, y in batches:
        total = total + F.cross_entropy(model(x), y, reduction="sum")
        count += len(y)
    return total / max(count, 1)


def hutchinson_traces(
    qmodel: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence,
    tol: float = 0.05,
    max_iterations: int = 50,
    min_iterations: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Tr(H_i) per layer (weights only) by Hutchinson's estimator, quantizers off, eval mode.

    Example usage::

        traces = hutchinson_traces(qmodel, layers, [(x, y)])
    """
    params = [layer.weight for layer in layers if layer.weight is not None]
    names = [layer.name for layer in layers if layer.weight is not None]
    generator = torch.Generator().manual_seed(seed)
    sums = [0.0] * len(params)
    previous: list[float] | None = None
    was_training = qmodel.training
    qmodel.eval()
    bar = _progress() if progress else None
    try:
        with disable_quant(qmodel), bar or contextlib.nullcontext():
            task = bar.add_task("Hessian trace", total=max_iterations) if bar else None
            loss = _loss(qmodel, batches)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            for k in range(1, max_iterations + 1):
                vs = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype).mul_(2).sub_(1) for p in params]
                hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                for i, (v, hv) in enumerate(zip(vs, hvs)):
                    sums[i] += float((v * hv).sum())
                means = [s / k for s in sums]
                if bar:
                    bar.update(task, advance=1)
                if previous is not None and k >= min_iterations and all(m >= 0 for m in means):
                    change = max(abs(m - p) / (abs(m) + 1e-12) for m, p in zip(means, previous))
                    if change < tol:
                        break
                previous = means
    finally:
        qmodel.train(was_training)
    return dict(zip(names, [s / k for s in sums]))


def sam_increases(
    qmodel: nn.Module, layers: Sequence[LayerInfo], batches: Sequence, rho: float = 0.05
) -> dict[str, float]:
    """L(w + ρ·g_i/‖g_i‖) − L(w) for each layer i alone (quantizers off, eval mode).

    Example usage::

        increases = sam_increases(qmodel, layers, [(x, y)], rho=0.05)
    """
    result = {}
    was_training = qmodel.training
    qmodel.eval()
    try:
        with disable_quant(qmodel):
            loss = _loss(qmodel, batches)
            params = [layer.weight for layer in layers if layer.weight is not None]
            grads = torch.autograd.grad(loss, params)
            base = float(loss.detach())
            with torch.no_grad():
                for layer, g in zip([lay for lay in layers if lay.weight is not None], grads):
                    eps = rho * g / (g.norm() + 1e-12)
                    layer.weight.add_(eps)
                    result[layer.name] = float(_loss(qmodel, batches)) - base
                    layer.weight.sub_(eps)
    finally:
        qmodel.train(was_training)
    return result


@torch.no_grad()
def quantization_error(weight: torch.Tensor, bits: int) -> float:
    """‖Q_b(w) − w‖² with per-output-channel symmetric steps initialised as LSQ does (2·mean|w|/√Qp)."""
    qmin, qmax = integer_range(bits, True)
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = (2 * flat.abs().mean(1) / math.sqrt(qmax)).clamp(min=1e-8)
    return float((fake_quantize(weight.detach(), scale, None, qmin, qmax, ch_axis=0) - weight).square().sum())
