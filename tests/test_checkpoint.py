"""fxquant.save / fxquant.load: recipe and state travel together; reloaded models compute bit-identical outputs."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxquant
from fxquant.checkpoint import FORMAT, CheckpointError, read
from fxquant.models import resnet20

from .strategies import INPUT_SHAPE, GeneratedNet, model_specs


def _train_a_little(qmodel, x, steps=2):
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        qmodel(x).float().square().mean().backward()
        optimizer.step()


@given(spec=model_specs(), recipe=st.sampled_from(["lsq_w4a4", "lsq_w2a4", "ptq_w8a8"]), new_bits=st.integers(2, 8))
def test_reload_is_bit_identical(tmp_path_factory, spec, recipe, new_bits):
    torch.manual_seed(0)
    x = torch.randn(INPUT_SHAPE)
    qmodel = fxquant.prepare_qat(GeneratedNet(spec), recipe)
    _train_a_little(qmodel, x)
    next(iter(qmodel.quantizers().values())).bits = new_bits  # run-time state is saved too
    path = fxquant.save(qmodel, tmp_path_factory.mktemp("ck") / "model.pt", extra={"epoch": 1})

    reloaded = fxquant.load(path, GeneratedNet(spec))
    for mode in ("eval", "train"):
        getattr(qmodel, mode)(), getattr(reloaded, mode)()
        with torch.no_grad():
            assert torch.equal(qmodel(x), reloaded(x)), mode
    assert [q.bits for q in reloaded.quantizers().values()] == [q.bits for q in qmodel.quantizers().values()]
    assert read(path)["extra"] == {"epoch": 1}


def test_checkpoint_is_weights_only_and_carries_the_recipe(tmp_path):
    qmodel = fxquant.prepare_qat(resnet20(), "lsq_w4a4", quant={"bn": "fold"})
    path = fxquant.save(qmodel, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT
    assert 'bn = "fold"' in payload["recipe_toml"]
    assert fxquant.load(path, resnet20()).recipe.quant.bn == "fold"


def test_resuming_a_search_recipe_keeps_the_plan_and_the_learned_steps(tmp_path, monkeypatch):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 28, 28), torch.arange(32) % 10)
    recipe = {"extends": "lsq_w4a4", "search": {"method": "sam", "budget": "avg3", "batches": 1}}
    qmodel = fxquant.prepare_qat(resnet20(), recipe)
    fxquant.fit(qmodel, data, None, {"epochs": 1, "batch_size": 16}, progress=False)
    plan = dict(qmodel.bit_plan)
    path = fxquant.save(qmodel, tmp_path / "searched.pt")
    resumed = fxquant.load(path, resnet20())
    assert resumed.bit_plan == plan
    steps = {n: q.scale.detach().clone() for n, q in resumed.quantizers().items()}

    def no_search(*args, **kwargs):
        raise AssertionError("a resumed run searched again")

    monkeypatch.setattr(fxquant.workflow, "search_for_recipe", no_search)
    fxquant.fit(
        resumed, data, None, {"epochs": 1, "batch_size": 16, "lr": 1e-12, "quantizer_lr": 1e-12}, progress=False
    )
    for name, q in resumed.quantizers().items():  # not re-initialised from data: only a 1e-12 step moved them
        torch.testing.assert_close(q.scale.detach(), steps[name], rtol=1e-6, atol=1e-9)


def test_errors_are_clear(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an fxquant checkpoint"):
        fxquant.load(tmp_path / "plain.pt", resnet20())
    with pytest.raises(CheckpointError, match="no such file"):
        fxquant.load(tmp_path / "missing.pt", resnet20())
    path = fxquant.save(fxquant.prepare_qat(resnet20(), "lsq_w4a4"), tmp_path / "r20.pt")
    with pytest.raises(CheckpointError, match="same architecture"):
        fxquant.load(path, fxquant.models.mobilenet_v2_small())
    with pytest.raises(CheckpointError, match="QATModel"):
        fxquant.save(resnet20(), tmp_path / "float.pt")
