"""insert_quantizers: a weight fake-quant for every quantized layer, an activation fake-quant per input.

* A module layer (Conv2d, Linear, ConvTranspose2d, ConvBn, ...) is swapped for its quantized subclass, which
  carries ``weight_quantizer`` and shares the float parameters (state_dict keys are unchanged).
* A functional conv/linear gets a quantizer node on its weight argument (one per weight tensor, however many
  ops read it).
* Each activation a quantized op reads gets one quantizer node right after the tensor is produced, shared by
  every consumer that asks for the same QuantizerConfig — a tensor is never quantized twice.

Quantizers are inserted for 16/32-bit specs too (as pass-throughs), so that bits can change at run time.
Running the pass again changes nothing: quantized layers and quantizer-fed inputs are recognised.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from fxquant.quant.layers import ConvBn, QuantizedLayer, to_quantized, weight_channel_axis
from fxquant.quant.quantizers import FakeQuantizer, group_problem, make_quantizer
from fxquant.quant.spec import QuantizerConfig

from .annotate import LAYER_KEY, SPEC_KEY
from .context import LayerRecord, PassContext
from .patterns import activation_inputs, functional_weight, is_quantizer_node, op_type, quantized_source

QUANTIZERS_KEY = "fxquant_quantizers"


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _weight_axis_for_function(op: str) -> int:
    return 1 if op.startswith("conv_transpose") or op == "addmm" else 0


def _attribute(gm: fx.GraphModule, target: str) -> object:
    owner: object = gm
    for part in target.split("."):
        owner = getattr(owner, part, None)
    return owner


def _fit_groups(config: QuantizerConfig, weight: object, layer: str, ctx: PassContext) -> QuantizerConfig:
    """per_group needs rows that split into whole groups; a layer whose rows do not is quantized per channel
    (as torchao leaves such layers out of its grouped quantizer), and the report says so."""
    if not isinstance(weight, torch.Tensor):
        return config
    problem = group_problem(config, weight)
    if problem is None:
        return config
    ctx.note(f"{layer}: per_group weights fall back to per_channel ({problem})")
    return replace(config, granularity="per_channel")


def _quantize_module_weight(
    gm: fx.GraphModule, node: fx.Node, config: QuantizerConfig, ctx: PassContext
) -> tuple[str, bool]:
    """The weight quantizer's path, and whether it was created now (False: the layer already had one)."""
    module = gm.get_submodule(node.target)
    created = False
    config = _fit_groups(config, getattr(module, "weight", None), node.meta[LAYER_KEY], ctx)
    if isinstance(module, ConvBn):
        if not isinstance(module.weight_quantizer, FakeQuantizer):
            module.weight_quantizer = make_quantizer(config, "weight", ch_axis=weight_channel_axis(module))
            created = True
    elif not isinstance(module, QuantizedLayer):
        quantizer = make_quantizer(config, "weight", ch_axis=weight_channel_axis(module))
        parent, _, name = str(node.target).rpartition(".")
        gm.get_submodule(parent).register_module(name, to_quantized(module, quantizer))
        created = True
    return f"{node.target}.weight_quantizer", created


def _quantize_functional_weight(
    gm: fx.GraphModule, node: fx.Node, config: QuantizerConfig, done: dict[fx.Node, fx.Node], op: str, ctx: PassContext
) -> tuple[str | None, bool]:
    """The weight quantizer's path (None: no weight to quantize), and whether the graph changed now."""
    weight = functional_weight(node)
    if weight is None:
        return None, False
    if weight.op == "get_attr":
        config = _fit_groups(config, _attribute(gm, str(weight.target)), node.meta[LAYER_KEY], ctx)
    elif config.granularity == "per_group":  # a computed weight: its shape is known only when it runs
        ctx.note(f"{node.meta[LAYER_KEY]}: per_group weights fall back to per_channel (the weight is computed)")
        config = replace(config, granularity="per_channel")
    if is_quantizer_node(gm, weight):
        return str(weight.target), False
    qnode = done.get(weight)
    if qnode is None:
        base = str(weight.target).replace(".", "_") if weight.op == "get_attr" else weight.name
        name = _free_name(gm, f"{base}_quantizer")
        gm.add_submodule(name, make_quantizer(config, "weight", ch_axis=_weight_axis_for_function(op)))
        with gm.graph.inserting_after(weight):
            qnode = gm.graph.call_module(name, (weight,))
        done[weight] = qnode
    node.replace_input_with(weight, qnode)
    return str(qnode.target), True


def insert_quantizers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Insert weight and activation quantizers for every annotated node; record them in ``ctx.layers``."""
    modified = False
    weight_done: dict[fx.Node, fx.Node] = {}
    act_done: dict[tuple[fx.Node, QuantizerConfig], fx.Node] = {}
    for node in list(gm.graph.nodes):
        spec = node.meta.get(SPEC_KEY)
        if spec is None:
            continue
        op = op_type(gm, node)
        record = LayerRecord(
            name=node.meta[LAYER_KEY],
            op=op,
            piece=ctx.piece,
            node=node.name,
            spec=spec,
            role=node.meta.get("fxquant_role", ""),
        )
        if spec.weight is not None:
            if node.op == "call_module":
                record.weight_quantizer, created = _quantize_module_weight(gm, node, spec.weight, ctx)
            else:
                record.weight_quantizer, created = _quantize_functional_weight(
                    gm, node, spec.weight, weight_done, op, ctx
                )
            modified |= created
        for _, source in activation_inputs(gm, node):
            quantizer = quantized_source(gm, source)
            if quantizer is not None:
                record.activation_quantizers.append(str(quantizer.target))
                continue
            key = (source, spec.activation)
            qnode = act_done.get(key)
            if qnode is None:
                name = _free_name(gm, f"{source.name}_act_quantizer")
                gm.add_submodule(name, make_quantizer(spec.activation, "activation"))
                with gm.graph.inserting_after(source):
                    qnode = gm.graph.call_module(name, (source,))
                act_done[key] = qnode
            node.replace_input_with(source, qnode)
            modified = True
            record.activation_quantizers.append(str(qnode.target))
        node.meta[QUANTIZERS_KEY] = record
        ctx.layers[f"{ctx.piece}:{node.name}"] = record
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)
