"""Checkpoints as hostile input: every malformed or tampered file is a one-line CheckpointError naming the file
and the field; a file holding pickled code is refused without advice to run it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import fxquant
from fxquant.checkpoint import CheckpointError
from fxquant.models import resnet20


class _RunsCode:
    def __reduce__(self):
        return (print, ("this would have run",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = fxquant.save(fxquant.prepare_qat(resnet20(), "lsq_w4a4"), tmp_path_factory.mktemp("ck") / "good.pt")
    return torch.load(path, weights_only=True)


def _first_quantizer(payload):
    return next(iter(payload["quantizers"]))


def _first_weight(payload):
    return next(name for name in payload["state_dict"] if name.endswith("weight"))


MUTATIONS = {
    "recipe not TOML": (lambda p: p.update(recipe_toml="[quant\nx="), "recipe_toml"),
    "recipe not a string": (lambda p: p.update(recipe_toml=3), "recipe_toml"),
    "recipe with a bad key": (lambda p: p.update(recipe_toml=p["recipe_toml"] + "\n[wat]\nx = 1\n"), "recipe_toml"),
    "recipe naming a file": (lambda p: p.update(recipe_toml="extends = '/etc/passwd'\n"), "recipe_toml"),
    "recipe with escapes": (lambda p: p.update(recipe_toml='"\\u001b[2J" = 1\n'), "recipe_toml"),
    "missing field": (lambda p: p.pop("quantizers"), "quantizers"),
    "unknown field": (lambda p: p.update(surprise=1), "surprise"),
    "leaf_modules not strings": (lambda p: p.update(leaf_modules=[1]), "leaf_modules"),
    "enabled a string": (lambda p: p["quantizers"][_first_quantizer(p)].update(enabled="no"), "quantizers."),
    "bits 99": (lambda p: p["quantizers"][_first_quantizer(p)].update(bits=99), "quantizers."),
    "quantizer state a list": (lambda p: p["quantizers"].update({_first_quantizer(p): [4]}), "quantizers."),
    "quantizer state missing bits": (lambda p: p["quantizers"][_first_quantizer(p)].pop("bits"), "quantizers."),
    "bit plan of strings": (lambda p: p.update(bit_plan={"conv1": ["4", 4]}), "bit_plan.conv1"),
    "bit plan not pairs": (lambda p: p.update(bit_plan={"conv1": 4}), "bit_plan.conv1"),
    "int64 weights": (
        lambda p: p["state_dict"].update({_first_weight(p): p["state_dict"][_first_weight(p)].long()}),
        "state_dict.",
    ),
    "weights of another shape": (
        lambda p: p["state_dict"].update({_first_weight(p): torch.zeros(3)}),
        "does not fit",
    ),
    "state not a tensor": (lambda p: p["state_dict"].update({_first_weight(p): [1.0]}), "state_dict."),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_malformed_content_is_a_located_checkpoint_error(tmp_path, saved, mutation):
    change, field = MUTATIONS[mutation]
    payload = copy.deepcopy(saved)
    change(payload)
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        fxquant.load(path, resnet20())
    text = str(err.value)
    assert text.startswith(f"{path}: ") and field in text, text
    assert "\n" not in text and text.isprintable(), text


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, bytes(range(256)) * 4, b"PK\x03\x04garbage"])
def test_random_bytes_are_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "noise.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint") as err:
        fxquant.load(path, resnet20())
    assert "\n" not in str(err.value)


def test_a_directory_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        fxquant.load(tmp_path, resnet20())


def test_pickled_code_is_refused_without_advice_to_run_it(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "fxquant-checkpoint/1", "x": _RunsCode()}, path)
    with pytest.raises(CheckpointError) as err:
        fxquant.load(path, resnet20())
    text = str(err.value)
    assert "contains pickled code" in text and "do not load it with weights_only=False" in text
    assert "will likely succeed" not in text
    assert "would have run" not in capsys.readouterr().out
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_RunsCode(), protocol=2))  # the protocol torch.load reads
    with pytest.raises(CheckpointError, match="pickled code"):
        fxquant.load(raw, resnet20())
