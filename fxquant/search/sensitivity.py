"""How much each layer's loss cares about its weights and its input activations: Hutchinson's Hessian trace, a
per-layer SAM step, and the quantization errors ‖Q_b(w) − w‖², ‖Q_b(a) − a‖² that turn sensitivities into the
perturbation term Ω_i(b) = S_w/n_w·‖Q_b(w) − w‖² + S_a/n_a·‖Q_b(a) − a‖².

Both measures look at the float loss (quantizers off, eval mode) on calibration batches. Since a plan ties each
layer's weight and activation widths, both terms count: the activation variables are the outputs of the
layers' input quantizers (each a distinct node in the graph, so a gradient at it is this layer's alone).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch import nn

from fxquant.config.sections import SearchConfig
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


class ActivationTaps:
    """Forward hooks on activation quantizers that make each output a variable of its own (so the loss can be
    differentiated at it), record it, and optionally add a perturbation to it.

    Example usage::

        with ActivationTaps(quantizers) as taps:
            loss = model(x).sum()
        grads = torch.autograd.grad(loss, taps.values())
    """

    def __init__(self, quantizers: Sequence[nn.Module]):
        self.quantizers = list(quantizers)
        self.recorded: dict[int, list[torch.Tensor]] = {id(q): [] for q in self.quantizers}
        self.shift: dict[int, list[torch.Tensor]] = {}  # per quantizer, one perturbation per forward, in order
        self._handles: list = []
        self._calls: dict[int, int] = {}

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        output = output.view_as(output)  # a node read by this layer only
        if not output.requires_grad and torch.is_grad_enabled():
            output = output.detach().requires_grad_(True)  # the model's input: a variable like any activation
        calls = self._calls.get(id(module), 0)
        self._calls[id(module)] = calls + 1
        if id(module) in self.shift:
            output = output + self.shift[id(module)][calls]
        self.recorded[id(module)].append(output)
        return output

    def __enter__(self) -> ActivationTaps:
        self._handles = [q.register_forward_hook(self._hook) for q in self.quantizers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def values(self) -> list[torch.Tensor]:
        return [t for q in self.quantizers for t in self.recorded[id(q)]]

    def reset(self) -> None:
        self.recorded = {id(q): [] for q in self.quantizers}
        self._calls = {}


def hutchinson_traces(
    qmodel: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence,
    config: SearchConfig,
    *,
    min_iterations: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> dict[object, float]:
    """Tr(H) per layer by Hutchinson's estimator, quantizers off, eval mode: of each weight block, keyed by layer
    name, and (``config.activations``) of each owned input activation, keyed ``(layer name, i)`` — summed over
    the calibration batches' activation elements. Iterates until every running mean moves less than
    ``config.tol`` (relative), at least ``min_iterations`` and at most ``config.max_iterations`` times.

    Example usage::

        traces = hutchinson_traces(qmodel, layers, [(x, y)], SearchConfig(budget="avg3"))
    """
    tol, max_iterations, activations = config.tol, config.max_iterations, config.activations
    weighted = [layer for layer in layers if layer.weight is not None]
    quantizers = [q for layer in layers for q in layer.activations] if activations else []
    keys: list[object] = [layer.name for layer in weighted]
    keys += [(layer.name, i) for layer in layers for i, _ in enumerate(layer.activations)] if activations else []
    generator = torch.Generator().manual_seed(seed)
    previous: list[float] | None = None
    was_training = qmodel.training
    qmodel.eval()
    bar = _progress() if progress else None
    try:
        with disable_quant(qmodel), bar or contextlib.nullcontext(), ActivationTaps(quantizers) as taps:
            task = bar.add_task("Hessian trace", total=max_iterations) if bar else None
            loss = _loss(qmodel, batches)
            # one variable per weight block, and per activation quantizer and batch (its forwards, in order)
            per_quantizer = [taps.recorded[id(q)] for q in quantizers]
            variables = [layer.weight for layer in weighted] + [t for ts in per_quantizer for t in ts]
            owner = list(range(len(weighted))) + [len(weighted) + j for j, ts in enumerate(per_quantizer) for _ in ts]
            sums = [0.0] * len(keys)
            grads = torch.autograd.grad(loss, variables, create_graph=True)
            for k in range(1, max_iterations + 1):
                # Rademacher probes drawn on the CPU (the same on every device), used where each variable is
                vs = [
                    torch.randint(0, 2, v.shape, generator=generator, device="cpu").to(v.device, v.dtype) * 2 - 1
                    for v in variables
                ]
                hvs = torch.autograd.grad(grads, variables, grad_outputs=vs, retain_graph=True)
                products = torch.stack([(v * hv).sum().float() for v, hv in zip(vs, hvs)]).tolist()  # one read
                for i, product in zip(owner, products):
                    sums[i] += product
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
    return dict(zip(keys, [s / k for s in sums]))


def sam_increases(
    qmodel: nn.Module, layers: Sequence[LayerInfo], batches: Sequence, config: SearchConfig
) -> dict[object, float]:
    """L(w + ρ·g_i/‖g_i‖) − L(w) for each layer i alone (quantizers off, eval mode; ρ = ``config.rho``), keyed by
    layer name; with ``config.activations``, the same for each owned input activation (keyed ``(layer name, i)``),
    its ε one tensor across the calibration batches.

    Example usage::

        increases = sam_increases(qmodel, layers, [(x, y)], SearchConfig(budget="avg3", rho=0.05))
    """
    rho, activations = config.rho, config.activations
    result: dict[object, float] = {}
    was_training = qmodel.training
    qmodel.eval()
    quantizers = [q for layer in layers for q in layer.activations] if activations else []
    try:
        with disable_quant(qmodel), ActivationTaps(quantizers) as taps:
            loss = _loss(qmodel, batches)
            weighted = [layer for layer in layers if layer.weight is not None]
            recorded = [list(taps.recorded[id(q)]) for q in quantizers]  # later forwards record more
            grads = torch.autograd.grad(loss, [lay.weight for lay in weighted] + [t for ts in recorded for t in ts])
            base = float(loss.detach())
            weight_grads, activation_grads = grads[: len(weighted)], list(grads[len(weighted) :])
            with torch.no_grad():
                for layer, g in zip(weighted, weight_grads):
                    eps = rho * g / (g.norm() + 1e-12)
                    layer.weight.add_(eps)
                    result[layer.name] = float(_loss(qmodel, batches)) - base
                    layer.weight.sub_(eps)
                keys = [(layer.name, i) for layer in layers for i, _ in enumerate(layer.activations)]
                for key, q, ts in zip(keys, quantizers, recorded):
                    gs = [activation_grads.pop(0) for _ in ts]
                    norm = torch.sqrt(sum(g.square().sum() for g in gs)) + 1e-12
                    taps.shift = {id(q): [rho * g / norm for g in gs]}
                    taps.reset()
                    result[key] = float(_loss(qmodel, batches)) - base
                    taps.shift = {}
    finally:
        qmodel.train(was_training)
    return result


@torch.no_grad()
def activation_quantization_error(values: Sequence[torch.Tensor], bits: int) -> float:
    """‖Q_b(a) − a‖² over recorded activations, one per-tensor step initialised as LSQ does (2·mean|a|/√Qp),
    unsigned when every value is ≥ 0 (after a ReLU)."""
    flat = torch.cat([v.detach().flatten() for v in values])
    signed = bool((flat < 0).any())
    qmin, qmax = integer_range(bits, signed)
    scale = (2 * flat.abs().mean() / math.sqrt(qmax)).clamp(min=1e-8).reshape(1)
    return float((fake_quantize(flat, scale, None, qmin, qmax) - flat).square().sum())


@torch.no_grad()
def quantization_error(weight: torch.Tensor, bits: int) -> float:
    """‖Q_b(w) − w‖² with per-output-channel symmetric steps initialised as LSQ does (2·mean|w|/√Qp)."""
    qmin, qmax = integer_range(bits, True)
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = (2 * flat.abs().mean(1) / math.sqrt(qmax)).clamp(min=1e-8)
    return float((fake_quantize(weight.detach(), scale, None, qmin, qmax, ch_axis=0) - weight).square().sum())
