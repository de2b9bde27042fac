"""assign_bits: set every quantizer's bit width from the annotated specs, or from the recipe's bit plan.

A bit plan maps layer names to (weight_bits, activation_bits); None keeps the spec's width. The pass only
changes quantizer attributes, never the graph. The widths are set by :func:`fxquant.quant.apply_bit_plan`, the
one function that applies plans (``fxquant.search.apply`` uses it on a prepared model): an activation quantizer
shared by layers given different widths takes the widest of them, and the context says so.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxquant.quant.controls import LayerQuantizers, apply_bit_plan

from .context import PassContext
from .insert_quantizers import QUANTIZERS_KEY


def assign_bits(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Apply ``ctx.recipe.bit_plan`` (layers it does not name keep their spec's widths) to ``gm``'s quantizers.
    Plan names are checked against the whole model by the caller: a piece holds only some of its layers. Sets
    quantizer state only: the graph is not modified."""
    records = [n.meta[QUANTIZERS_KEY] for n in gm.graph.nodes if QUANTIZERS_KEY in n.meta]
    layers = [
        LayerQuantizers(
            record.name,
            gm.get_submodule(record.weight_quantizer) if record.weight_quantizer else None,
            tuple(gm.get_submodule(path) for path in record.activation_quantizers),
            (record.spec.weight_bits, record.spec.activation_bits),
        )
        for record in records
    ]
    for note in apply_bit_plan(layers, ctx.recipe.bit_plan):
        ctx.note(note)
    return PassResult(gm, False)
