"""verify: ``graph.lint()`` plus fxquant's own invariants on a prepared graph.

* every quantized op with a weight has exactly one weight quantizer, and it exists;
* every activation input of a quantized op comes from a quantizer;
* no quantizer is fed by another quantizer (a tensor is never quantized twice);
* every ``call_module`` target exists.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxquant.errors import PrepareError
from fxquant.quant.layers import QuantizedLayer
from fxquant.quant.quantizers import FakeQuantizer

from .annotate import SPEC_KEY
from .context import PassContext
from .insert_quantizers import QUANTIZERS_KEY
from .patterns import activation_inputs, functional_weight, is_perturbation, is_quantizer_node


def check_invariants(gm: fx.GraphModule) -> list[str]:
    """The invariant violations of ``gm``, as sentences (empty when it is sound)."""
    problems: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            try:
                gm.get_submodule(node.target)
            except AttributeError:
                problems.append(f"{node.name} calls missing module {node.target}")
                continue
            if is_quantizer_node(gm, node):
                source = node.args[0]
                if isinstance(source, fx.Node) and is_quantizer_node(gm, source):
                    problems.append(f"{node.name} quantizes the output of quantizer {source.name}")
        spec = node.meta.get(SPEC_KEY)
        if spec is None or QUANTIZERS_KEY not in node.meta:
            continue
        if spec.weight is not None:
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                if not isinstance(module, QuantizedLayer) or not isinstance(module.weight_quantizer, FakeQuantizer):
                    problems.append(f"{node.name}: layer {node.target} has no weight quantizer")
            else:
                weight = functional_weight(node)
                if weight is not None and not is_quantizer_node(gm, weight):
                    problems.append(f"{node.name}: functional weight {weight.name} is not quantized")
        for _, source in activation_inputs(gm, node):
            if is_perturbation(gm, source):  # FPQ's noise sits between the quantizer and its op
                source = source.args[0]
            if not is_quantizer_node(gm, source):
                problems.append(f"{node.name}: activation input {source.name} is not quantized")
    return problems


def verify(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Raise PrepareError listing every violated invariant; return ``gm`` untouched otherwise."""
    gm.graph.lint()
    problems = check_invariants(gm)
    if problems:
        where = f" in {ctx.piece}" if ctx.piece else ""
        raise PrepareError(f"prepared graph{where} breaks fxquant's invariants: " + "; ".join(problems))
    return PassResult(gm, False)
