"""Recipes: built-ins, extends, and errors that name the file, the key path and the nearest key."""

import pytest
import torch
from torch import nn

import fxquant
from fxquant import RecipeError, load_recipe
from fxquant.config import LayerBits, dumps_toml

BUILTINS = ["lsq_w8a8", "lsq_w4a4", "lsq_w3a3", "lsq_w2a2", "lsq_w2a4", "ptq_w8a8"]


def test_every_builtin_loads():
    assert set(BUILTINS) <= set(fxquant.builtin_names())
    for name in fxquant.builtin_names():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description


def test_low_bit_builtins_keep_first_and_last_layer_at_8_bits():
    recipe = load_recipe("lsq_w2a4")
    assert (recipe.quant.weight.bits, recipe.quant.activation.bits) == (2, 4)
    assert recipe.quant.weight.granularity == "per_channel"
    assert recipe.quant.first_layer == LayerBits(weight_bits=8, activation_bits=8)
    assert recipe.quant.last_layer == LayerBits(weight_bits=8, activation_bits=8)
    assert load_recipe("ptq_w8a8").quant.weight.scheme == "observer"


def write(tmp_path, text, name="r.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_names_file_key_path_and_closest_key(tmp_path):
    path = write(tmp_path, '[[quant.rule]]\nmatch = { type = "Conv2d" }\n[[quant.rule]]\nweight = { bitz = 3 }\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    assert err.source == str(path)
    assert err.key_path == "quant.rule[1].weight.bitz"
    assert err.suggestion == "bits"
    assert "did you mean 'bits'" in str(err)


@pytest.mark.parametrize(
    ("text", "key_path", "fragment"),
    [
        ("[quant]\nweight = { bits = 9 }\n", "quant.weight.bits", "2..8"),
        ('[quant]\nweight = { bits = "4" }\n', "quant.weight.bits", "an integer"),
        ("[quant]\nweight = { symmetric = 1 }\n", "quant.weight.symmetric", "a boolean"),
        ('[quant]\nbn = "folded"\n', "quant.bn", "one of keep, fold"),
        ('[quant]\nactivation = { scheme = "lsqq" }\n', "quant.activation.scheme", "one of"),
        ("[train]\nepochs = 0\n", "train.epochs", "> 0"),
        ("[qaunt]\n", "qaunt", "unknown key"),
        ("quant = 3\n", "quant", "must be a table"),
        ("[quant\n", "", "not valid TOML"),
    ],
)
def test_bad_values_are_rejected_with_their_key_path(tmp_path, text, key_path, fragment):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    assert info.value.key_path == key_path
    assert fragment in str(info.value)


def test_extends_merges_tables_and_replaces_lists(tmp_path):
    write(tmp_path, '[quant]\nweight = { bits = 3 }\nleaf_modules = ["a", "b"]\n', "base.toml")
    child = write(tmp_path, 'extends = "base.toml"\n[quant]\nactivation = { bits = 5 }\nleaf_modules = ["c"]\n')
    recipe = load_recipe(child)
    assert recipe.quant.weight.bits == 3 and recipe.quant.activation.bits == 5
    assert recipe.quant.leaf_modules == ("c",)
    assert (
        load_recipe(write(tmp_path, 'extends = "lsq_w4a4"\n[quant]\nbn = "fold"\n', "c2.toml")).quant.weight.bits == 4
    )


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, 'extends = "b.toml"\n', "a.toml")
    write(tmp_path, 'extends = "a.toml"\n', "b.toml")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.toml")


def test_unknown_builtin_suggests_the_closest():
    with pytest.raises(RecipeError, match="did you mean 'lsq_w4a4'"):
        load_recipe("lsq_w4a5")


def test_rule_that_matches_nothing_lists_the_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 6, 6))
    recipe = {"quant": {"rule": [{"match": {"name": "layer9.*"}, "weight": {"bits": 2}}]}}
    with pytest.raises(RecipeError) as info:
        fxquant.prepare_qat(model, recipe)
    assert info.value.key_path == "quant.rule[0].match"
    assert "0 (Conv2d)" in str(info.value) and "3 (Linear)" in str(info.value)


def test_overrides_are_validated_too():
    with pytest.raises(RecipeError, match="overrides"):
        load_recipe("lsq_w4a4", {"quant": {"weight": {"bits": 1}}})
    assert load_recipe("lsq_w4a4", {"quant": {"weight": {"bits": 3}}}).quant.weight.bits == 3


def test_to_toml_round_trips():
    recipe = load_recipe("lsq_w2a4", {"quant": {"rule": [{"match": {"type": "Linear"}, "weight": {"bits": 8}}]}})
    again = fxquant.Recipe.from_dict(__import__("tomllib").loads(dumps_toml(recipe.toml)))
    assert again.toml == recipe.toml and again.quant == recipe.quant


def test_a_relative_plan_is_found_next_to_the_recipe_that_declares_it(tmp_path, monkeypatch):
    """Also when a child in another folder extends it, with overrides, and after save/load elsewhere."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "plan.toml").write_text('[plan]\n"layer1.0.conv1" = { weight = 2, activation = 3 }\n')
    write(tmp_path / "base", 'extends = "lsq_w4a4"\n[bits]\nplan = "plan.toml"\n', "parent.toml")
    child = write(tmp_path, 'extends = "base/parent.toml"\n[quant]\nbn = "fold"\n', "child.toml")
    monkeypatch.chdir(tmp_path / "base")  # the working directory plays no part
    for recipe in (load_recipe(child), load_recipe(child, {"train": {"epochs": 2}})):
        assert recipe.bit_plan == {"layer1.0.conv1": (2, 3)}
    qmodel = fxquant.prepare_qat(fxquant.models.resnet20(), load_recipe(child, {"train": {"epochs": 2}}))
    path = fxquant.save(qmodel, tmp_path / "elsewhere" / "ck.pt")
    (tmp_path / "base" / "plan.toml").unlink()  # the checkpoint carries the plan itself
    reloaded = fxquant.load(path, fxquant.models.resnet20())
    layer = next(r for r in reloaded.report.layers if r.name == "layer1.0.conv1")
    weight_q, act_qs = reloaded.layer_quantizers(layer)
    assert weight_q.bits == 2 and {q.bits for q in act_qs} == {3}


def test_sections_validate_on_construction_and_override():
    assert load_recipe("lsq_w4a4").train.override(epochs=5).epochs == 5
    with pytest.raises(RecipeError, match=r"epochs: must be > 0"):
        load_recipe("lsq_w4a4").train.override(epochs=0)
    with pytest.raises(ValueError, match="lr: must be a finite number"):
        fxquant.config.TrainConfig(lr=float("inf"))
    keys = dict(fxquant.config.describe(fxquant.Recipe))
    assert "loss[kind=fpq].p" in keys and "perturbation probability" in keys["loss[kind=fpq].p"]


def test_loading_a_recipe_never_executes_code(tmp_path):
    marker = tmp_path / "executed"
    path = write(tmp_path, f"name = \"__import__('os').mkdir('{marker}')\"\n")
    load_recipe(path)
    assert not marker.exists()
