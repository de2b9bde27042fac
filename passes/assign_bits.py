"""assign_bits: set every quantizer's bit width from the annotated specs or from a bit plan.

A bit plan maps layer names to (weight_bits, activation_bits); None keeps a width as it is. The pass only
changes quantizer attributes, never the graph, so a plan applies to a prepared model without re-tracing.
An activation quantizer shared by layers that the plan gives different widths takes the widest of them
(quantizing one tensor once beats matching every consumer), and the context says so.
"""

from __future__ import annotations

from torch import fx

from fxquant.errors import FxQuantError, closest

from .context import PassContext
from .insert_quantizers import QUANTIZERS_KEY


def check_plan_layers(plan: dict, names: set[str]) -> None:
    """Raise FxQuantError, with the closest layer name, if ``plan`` names a layer not in ``names``."""
    unknown = [name for name in plan if name not in names]
    if unknown:
        hint = closest(unknown[0], names)
        raise FxQuantError(
            f"bit plan names layer {unknown[0]!r}, which the model does not have"
            + (f" (did you mean {hint!r}?)" if hint else "")
        )


def assign_bits(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Apply ``ctx.bit_plan`` (or the recipe's widths when there is none) to the quantizers of ``gm``."""
    records = [n.meta[QUANTIZERS_KEY] for n in gm.graph.nodes if QUANTIZERS_KEY in n.meta]
    plan = ctx.bit_plan or {}
    check_plan_layers(plan, {r.name for r in ctx.layers.values()})
    activation_bits: dict[str, int] = {}
    for record in records:
        w_bits, a_bits = plan.get(record.name, (None, None))
        w_bits = w_bits if w_bits is not None else record.spec.weight_bits
        a_bits = a_bits if a_bits is not None else record.spec.activation_bits
        if record.weight_quantizer is not None:
            gm.get_submodule(record.weight_quantizer).bits = w_bits
        for path in record.activation_quantizers:
            if path in activation_bits and activation_bits[path] != a_bits:
                ctx.note(
                    f"{ctx.qualify(path)} feeds layers given {activation_bits[path]} and {a_bits} "
                    f"activation bits; it uses {max(activation_bits[path], a_bits)}"
                )
            activation_bits[path] = max(a_bits, activation_bits.get(path, 0))
    for path, bits in activation_bits.items():
        gm.get_submodule(path).bits = bits
    return gm
