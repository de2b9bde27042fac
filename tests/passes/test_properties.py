"""The prepare invariants over generated models and recipes: quantizers off computes the original (1), one weight
quantizer per layer and no tensor quantized twice (3), passes idempotent and lint-clean (4), values on the grid (5),
state_dict round trip (8); each pass's own word on whether it modified the graph, and the order rules."""

import copy

import pytest
import torch
from fxquant.passes import (
    ORDER_RULES,
    PREPARE_PASSES,
    PassContext,
    annotate,
    assign_bits,
    check_invariants,
    check_order,
    fold_bn,
    fuse_activations,
    insert_quantizers,
    run_passes,
    trace_model,
    verify,
)
from fxquant.passes.patterns import is_quantizer_node
from hypothesis import given
from torch import fx, nn

import fxquant
from fxquant.config import load_recipe
from fxquant.errors import FxQuantError
from fxquant.quant.layers import QuantizedLayer
from tests.strategies import INPUT_SHAPE, feature_recipes, models, recipes


def _inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


@given(model=models(), recipe=recipes())
def test_disabled_quantizers_compute_the_original(model, recipe):
    """Invariant 1 (exact with BN kept; BN folding reorders float ops, so within rounding)."""
    qmodel = fxquant.prepare_qat(model, recipe)
    x = _inputs()
    original = copy.deepcopy(model)  # both then see the same sequence of BN statistic updates
    for train in (True, False):
        original.train(train)
        qmodel.train(train)
        with fxquant.disable_quant(qmodel):
            out = qmodel(x)
        expected = original(x)
        if recipe["quant"]["bn"] == "keep":
            assert torch.equal(out, expected)
        else:
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@given(model=models(), recipe=recipes())
def test_each_weight_has_exactly_one_quantizer_and_no_tensor_is_quantized_twice(model, recipe):
    """Invariant 3."""
    qmodel = fxquant.prepare_qat(model, recipe)
    gm = qmodel.graph_module
    assert check_invariants(gm) == []
    weights_quantized: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, QuantizedLayer):
                weights_quantized[id(module.weight)] = 1  # one module, one weight quantizer
        if is_quantizer_node(gm, node):
            source = node.args[0]
            assert not is_quantizer_node(gm, source)
            if source.op == "get_attr":
                key = id(
                    getattr(gm, str(source.target))
                    if "." not in str(source.target)
                    else gm.get_parameter(str(source.target))
                )
                weights_quantized[key] = weights_quantized.get(key, 0) + 1
    assert all(count == 1 for count in weights_quantized.values())
    # every conv/linear weight of the original model is quantized
    n_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)) for m in model.modules())
    n_functional = sum(op == "fconv" for op in model.spec.ops) + int(model.spec.functional_head)
    assert len(weights_quantized) == n_layers + n_functional


def _graph_state(gm: fx.GraphModule) -> tuple[str, list[tuple[str, str]]]:
    return gm.code, sorted((name, type(m).__name__) for name, m in gm.named_modules())


@given(model=models(), recipe=recipes())
def test_passes_are_idempotent_and_keep_the_graph_valid(model, recipe):
    """Invariant 4: a second run of each pass changes nothing; lint holds after every pass."""
    qmodel = fxquant.prepare_qat(model, recipe)
    gm = qmodel.graph_module
    ctx = PassContext(recipe=load_recipe(recipe))
    for fn in (annotate, fold_bn, insert_quantizers, fuse_activations, assign_bits, verify):
        before = _graph_state(gm)
        result = fn(gm, ctx)
        gm = result.graph_module
        gm.graph.lint()
        assert _graph_state(gm) == before, fn.__name__
        assert not result.modified, f"{fn.__name__} says it modified a graph it left as it was"


@given(model=models(), recipe=feature_recipes())
def test_each_pass_says_whether_it_modified_the_graph(model, recipe):
    """A pass's own ``modified`` agrees with an independent look at the code and the submodules before and after
    it, pass by pass through a fresh preparation."""
    loaded = load_recipe(recipe)
    traced = trace_model(copy.deepcopy(model).train(), (), None)
    gm = traced.pieces[""]
    ctx = PassContext(recipe=loaded, resolve_first=True, resolve_last=True)
    changed = set()
    for fn in PREPARE_PASSES:
        before = _graph_state(gm)
        result = fn(gm, ctx)
        gm = result.graph_module
        assert result.modified == (_graph_state(gm) != before), fn.__name__
        changed |= {fn.__name__} if result.modified else set()
    assert "insert_quantizers" in changed


def test_the_pass_order_is_data_the_manager_checks():
    check_order(PREPARE_PASSES, ORDER_RULES)  # the built-in sequence keeps every rule
    swapped = list(PREPARE_PASSES)
    i, j = swapped.index(annotate), swapped.index(insert_quantizers)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    with pytest.raises(FxQuantError, match="pass annotate must run before insert_quantizers: quantizers are inserted"):
        ctx = PassContext(recipe=load_recipe("lsq_w4a4"))
        run_passes(fx.symbolic_trace(nn.Linear(2, 2)), swapped, ctx, ORDER_RULES)


@given(model=models(), recipe=recipes())
def test_trained_model_values_lie_on_the_grid(model, recipe):
    """Invariant 5 on prepared models: every weight quantizer's output has at most 2^b levels per channel."""
    qmodel = fxquant.prepare_qat(model, recipe)
    qmodel(_inputs())  # initialise steps
    for layer in qmodel.report.layers:
        wq, _ = qmodel.layer_quantizers(layer)
        if wq is None or not wq.is_active:
            continue
        piece = qmodel.graph_modules()[layer.piece]
        node = next(n for n in piece.graph.nodes if n.name == layer.node)
        if node.op == "call_module":
            module = piece.get_submodule(node.target)
            w = module.quantized_weight().detach()
        else:
            source = node.args[1].args[0]
            w = wq(piece.get_parameter(str(source.target))).detach() if source.op == "get_attr" else None
        if w is None:
            continue
        channels = w.unbind(wq.ch_axis) if wq.ch_axis is not None else [w]
        assert all(c.unique().numel() <= 2**wq.bits for c in channels)


@given(model=models(), recipe=recipes())
def test_state_dict_round_trip_reproduces_outputs(model, recipe):
    """Invariant 8: save → load into a freshly prepared model gives identical outputs."""
    qmodel = fxquant.prepare_qat(model, recipe)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    qmodel(_inputs(1)).square().mean().backward()  # initialise and move the steps a little
    optimizer.step()
    fresh = fxquant.prepare_qat(model, recipe)
    fresh.load_state_dict(qmodel.state_dict())
    qmodel.eval()
    fresh.eval()
    x = _inputs(2)
    assert torch.equal(fresh(x), qmodel(x))
