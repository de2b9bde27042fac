"""Taps and FPQ perturbation nodes over generated models: they never change outputs (invariant 2), are idempotent,
and match what their selectors name."""

import torch
from fxquant.passes import (
    PassContext,
    annotate,
    assign_bits,
    fold_bn,
    insert_perturbations,
    insert_quantizers,
    insert_taps,
    verify,
)
from hypothesis import given

import fxquant
from fxquant.config import load_recipe
from fxquant.quant.taps import FeaturePerturbation, Tap

from ..strategies import INPUT_SHAPE, feature_recipes, models


def _without_features(recipe: dict) -> dict:
    return {k: v for k, v in recipe.items() if k not in ("taps", "loss")}


@given(model=models(), recipe=feature_recipes())
def test_taps_and_disabled_perturbations_never_change_outputs(model, recipe):
    torch.manual_seed(0)
    x = torch.randn(INPUT_SHAPE)
    plain = fxquant.prepare_qat(model, _without_features(recipe))
    tapped = fxquant.prepare_qat(model, recipe)
    plain(x)  # initialise the quantizers, then give both the same state
    tapped.load_state_dict(plain.state_dict())
    perturbations = [m for m in tapped.modules() if isinstance(m, FeaturePerturbation)]
    for m in perturbations:
        m.enabled = False
    for mode in ("train", "eval"):
        plain.train(mode == "train"), tapped.train(mode == "train")
        with torch.no_grad():
            assert torch.equal(plain(x), tapped(x)), mode
    for m in perturbations:
        m.enabled = True
    with torch.no_grad():  # eval mode: perturbations are off by themselves
        assert torch.equal(plain(x), tapped(x))
    tapped.train()
    tapped.taps.clear()
    tapped(x)
    assert set(tapped.taps) == set(load_recipe(recipe).features.taps)


@given(model=models(), recipe=feature_recipes())
def test_tap_passes_are_idempotent_and_graph_stays_valid(model, recipe):
    qmodel = fxquant.prepare_qat(model, recipe)
    gm = qmodel.graph_module
    ctx = PassContext(recipe=load_recipe(recipe))
    for fn in (annotate, fold_bn, insert_quantizers, insert_perturbations, insert_taps, assign_bits, verify):
        before = gm.code
        result = fn(gm, ctx)
        gm = result.graph_module
        gm.graph.lint()
        assert gm.code == before and not result.modified, fn.__name__
    taps = [m for m in gm.modules() if isinstance(m, Tap)]
    tap_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Tap)]
    assert all(not n.users for n in tap_nodes), "taps are side branches"
    assert len(taps) == len(tap_nodes)
