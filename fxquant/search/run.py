"""Sharpness-driven per-layer bit widths: sensitivity → exact allocation under a budget → a bit plan.

1. **Cost** (:func:`layer_table`): per quantized layer, MACs per sample from example inputs (``fxquant.cost``),
   BOPs(b_w, b_a) = MACs·b_w·b_a, weight bytes = params·b_w/8. Budgets (:func:`parse_budget`): ``0.25xW8A8``,
   ``0.5xFP32``, ``avg3`` (the BOPs of the uniform 3-bit recipe: 3 bits except the fixed first/last layers, so
   a searched plan is compared with ``lsq_w3a3`` at equal BOPs), ``1.2e9`` (absolute BOPs), ``size:150kB``.
2. **Sensitivity** on calibration batches, with the quantizers off (the sharpness of the float loss):
   :func:`hutchinson_traces` — Tr(H_i) of each layer's weight block by Hutchinson's estimator (Rademacher v,
   one Hessian-vector product per iteration for all layers; cross-layer terms vanish in expectation), until
   every layer's running mean moves less than ``tol`` (relative) — never stopping while a mean is negative;
   :func:`sam_increases` — L(w + ρ·g_i/‖g_i‖) − L(w), the loss increase of a SAM step restricted to layer i.
3. **Perturbation term** Ω_i(b) = S_i/n_i·‖Q_b(w_i) − w_i‖² + S_a/n_a·‖Q_b(a_i) − a_i‖² with Q_b the
   LSQ-initialised grid (per channel for weights, per tensor for the layer's input activations a_i, whose
   sensitivity S_a is measured the same way at the activation quantizer's output): a plan ties a layer's weight
   and activation widths, so both errors count (``activations=False``: the weight term only).
4. **Allocation** (:func:`allocate`): minimise Σ Ω_i(b_i) subject to Σ cost_i(b_i) ≤ budget, one width per layer
   (or per tied group: the user's ties plus layers reading one activation quantizer, which must share its
   width), fixed widths for the recipe's first/last layers; solved exactly by dynamic programming over Pareto
   frontiers (cost, Ω) — no discretisation of the budget.
5. **Plan**: ``{layer: (weight_bits, activation_bits)}``, saved as TOML (:func:`save_plan`), applied to a prepared
   model without re-tracing (:func:`apply`) or from a recipe's ``[bits] plan = "file.toml"``.

The pieces live in :mod:`.budget`, :mod:`.sensitivity`, :mod:`.allocation`, :mod:`.plan` and :mod:`.report`;
this module runs them in order.

Example usage::

    plan, table = fxquant.search.search(qmodel, batches, {"budget": "0.25xW8A8", "method": "hessian"})
    fxquant.search.apply(qmodel, plan)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fxquant.config.fields import Where, parse
from fxquant.config.sections import SearchConfig
from fxquant.errors import FxQuantError
from fxquant.qat_model import QATModel
from fxquant.quant.controls import disable_quant
from fxquant.train.devices import model_device, to_device

from .allocation import Option, allocate
from .budget import LayerInfo, layer_table, parse_budget, tie_groups
from .saq_generator import generate
from .sensitivity import (
    ActivationTaps,
    activation_quantization_error,
    hutchinson_traces,
    quantization_error,
    sam_increases,
)


def _record_activations(qmodel: QATModel, layers: Sequence[LayerInfo], batches: Sequence) -> dict[int, list]:
    """Each owned activation quantizer's inputs on the calibration batches (float model, eval mode)."""
    quantizers = [q for layer in layers for q in layer.activations]
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad(), disable_quant(qmodel), ActivationTaps(quantizers) as taps:
            for x, _ in batches:
                qmodel(x)
    finally:
        qmodel.train(was_training)
    return {id(q): [t.detach() for t in taps.recorded[id(q)]] for q in quantizers}


def search_config(config: SearchConfig | Mapping[str, Any]) -> SearchConfig:
    """``config`` as a validated ``[search]`` section (a mapping is checked like the recipe table).

    Example usage::

        search_config({"budget": "avg3", "method": "sam"}).widths   # (2, 3, 4, 8)
    """
    if isinstance(config, SearchConfig):
        return config
    return parse(SearchConfig, dict(config), Where("search(config=...)", "search"))


def search(
    qmodel: QATModel,
    batches: Sequence,
    config: SearchConfig | Mapping[str, Any],
    *,
    example_inputs: Any = None,
    tie: Sequence[Sequence[str]] = (),
    progress: bool = False,
    warmup_batches: Sequence = (),
) -> tuple[dict[str, tuple[int, int]], list[LayerInfo]]:
    """Sensitivity, then the exact allocation; returns (bit plan, per-layer table). ``config`` is the recipe's
    ``[search]`` section (:class:`~fxquant.config.sections.SearchConfig`, or a mapping of its keys: every default is
    the section's). Weight and activation bits are tied (each layer gets (b, b)). The recipe's first/last widths
    are kept unless ``search_first_last``, in which case they are searched too (an ``avgB`` budget still counts
    them at the recipe's widths: at ``avg2`` that is the only way a plan can differ from uniform 2 bits).
    ``method = "saq"`` learns the configuration with SAQ's generator instead (:mod:`fxquant.search.saq_generator`).
    Batches (and ``warmup_batches``, SAQ's supernet warm-up) are moved to the model's device.

    Example usage::

        plan, layers = search(qmodel, [(x, y)], {"budget": "0.25xW8A8", "method": "sam"})
    """
    config = search_config(config)
    device = model_device(qmodel)  # every batch is used where the model is
    batches = [to_device(tuple(batch), device) for batch in batches]
    warmup_batches = [to_device(tuple(batch), device) for batch in warmup_batches]
    if config.method == "saq":  # SAQ's learned generator: the last batch is held out
        if len(batches) < 2:
            raise FxQuantError("the saq method needs at least 2 batches (training and held-out)")
        plan, _ = generate(
            qmodel, batches[:-1], batches[-1:], config, example_inputs=example_inputs, warmup_batches=warmup_batches
        )
        layers = layer_table(qmodel, example_inputs)
        for layer in layers:
            layer.bits = plan[layer.name][0]
            layer.searched = not (layer.fixed_bits and not config.search_first_last)
        return plan, layers
    layers = layer_table(qmodel, example_inputs)
    limit = parse_budget(config.budget, layers)
    if config.method == "hessian":
        scores = hutchinson_traces(qmodel, layers, batches, config, progress=progress)
    else:
        scores = sam_increases(qmodel, layers, batches, config)
    recorded = _record_activations(qmodel, layers, batches) if config.activations else {}
    for layer in layers:
        layer.sensitivity = scores.get(layer.name, 0.0)
        layer.activation_sensitivity = tuple(scores.get((layer.name, i), 0.0) for i, _ in enumerate(layer.activations))
        # the budget still counts a first/last layer at its fixed width; searching it only widens the options
        layer.searched = not (layer.fixed_bits and not config.search_first_last)
        options = list(config.widths) if layer.searched else [layer.fixed_bits]
        n = max(layer.params, 1)
        layer.omega = {
            b: (layer.sensitivity / n * quantization_error(layer.weight, b) if layer.weight is not None else 0.0)
            + sum(
                s / sum(v.numel() for v in recorded[id(q)]) * activation_quantization_error(recorded[id(q)], b)
                for q, s in zip(layer.activations, layer.activation_sensitivity)
                if recorded.get(id(q))
            )
            for b in options
        }
    groups = tie_groups(qmodel, layers, tie)
    option_lists = []
    for members in groups:
        shared = set.intersection(*(set(m.omega) for m in members))
        if not shared:
            raise FxQuantError(f"tied layers {[m.name for m in members]} have no width in common")
        option_lists.append(
            [
                Option(b, sum(limit.cost(m, b) for m in members), sum(m.omega[b] for m in members))
                for b in sorted(shared)
            ]
        )
    picks, _, _ = allocate(option_lists, limit.limit)
    plan = {}
    for members, options, j in zip(groups, option_lists, picks):
        for m in members:
            m.bits = options[j].bits
            plan[m.name] = (options[j].bits, options[j].bits)
    return plan, layers
