"""Controls over a model's quantizers: turn them off, list them, and apply a bit plan.

:func:`apply_bit_plan` is the one place widths are set from a plan: the ``assign_bits`` pass uses it while
preparing, and :func:`fxquant.search.apply` after preparing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fxquant.errors import FxQuantError, closest

from .kernel import MIN_STEP
from .quantizers import FakeQuantizer, LSQQuantizer


@contextlib.contextmanager
def disable_quant(model: nn.Module) -> Iterator[nn.Module]:
    """Turn every quantizer of ``model`` off inside the block (the model computes in float), then restore.

    Example usage::

        with fxquant.disable_quant(qmodel):
            float_out = qmodel(x)
    """
    quantizers = list(quantizers_of(model).values())
    states = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield model
    finally:
        for q, state in zip(quantizers, states):
            q.enabled = state


@torch.no_grad()
def clamp_steps(model: nn.Module) -> None:
    """Keep every learned step of ``model`` at or above the smallest step the kernel applies (1e-8), in one
    call over all of them. :class:`fxquant.TrainStep` runs it after each optimizer step; the kernel clamps what
    it applies anyway, so a loop of your own only needs it to keep the stored steps equal to the applied ones.

    Example usage::

        optimizer.step()
        fxquant.quant.clamp_steps(qmodel)
    """
    steps = [p for m in model.modules() if isinstance(m, LSQQuantizer) for p in m.learned_steps()]
    if steps:
        torch._foreach_clamp_min_(steps, MIN_STEP)


def quantizers_of(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Every quantizer of ``model`` by module path.

    Example usage::

        {name: q.bits for name, q in quantizers_of(qmodel).items()}
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizer)}


@dataclass(frozen=True)
class LayerQuantizers:
    """One quantized layer's quantizers and the widths it has when a plan does not name it."""

    name: str
    weight: FakeQuantizer | None
    activations: tuple[FakeQuantizer, ...]
    default_bits: tuple[int | None, int | None] = (None, None)  # None: leave the width as it is


def check_plan_layers(plan: Mapping[str, object], names: Iterable[str], where: str = "bit plan") -> None:
    """Raise FxQuantError, with the closest layer name, if ``plan`` names a layer not in ``names``."""
    names = set(names)
    unknown = [name for name in plan if name not in names]
    if unknown:
        hint = closest(unknown[0], names)
        raise FxQuantError(
            f"{where} names layer {unknown[0]!r}, which the model does not have"
            + (f" (did you mean {hint!r}?)" if hint else "")
        )


def apply_bit_plan(
    layers: Iterable[LayerQuantizers], plan: Mapping[str, tuple[int | None, int | None]] | None
) -> list[str]:
    """Set the widths of ``layers``' quantizers: the plan's where it names the layer (None keeps a width),
    else each layer's ``default_bits``. An activation quantizer read by layers given different widths takes
    the widest (one tensor is quantized once). Returns notes on such conflicts.

    Example usage::

        apply_bit_plan([LayerQuantizers("fc", wq, (aq,))], {"fc": (3, 3)})
    """
    plan = plan or {}
    widest: dict[int, tuple[FakeQuantizer, int, str]] = {}
    notes: list[str] = []
    for layer in layers:
        w_bits, a_bits = plan.get(layer.name, (None, None))
        w_bits = w_bits if w_bits is not None else layer.default_bits[0]
        a_bits = a_bits if a_bits is not None else layer.default_bits[1]
        if w_bits is not None and layer.weight is not None:
            layer.weight.bits = w_bits
        for q in layer.activations if a_bits is not None else ():
            _, current, first = widest.get(id(q), (q, 0, layer.name))
            if current and current != a_bits:
                notes.append(
                    f"the input quantizer of {first} and {layer.name} is asked for {current} and {a_bits} "
                    f"activation bits; it uses {max(current, a_bits)}"
                )
            widest[id(q)] = (q, max(current, a_bits), first)
    for q, bits, _ in widest.values():
        q.bits = bits
    return notes
