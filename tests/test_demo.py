"""The demo: it starts from the FP resnet20 that ships with fxquant, which must be well trained."""

import pytest
import torch

from fxquant.cli import main
from fxquant.cli.demo import shipped_fp_checkpoint
from fxquant.data import fashion_mnist
from fxquant.models import resnet20
from fxquant.train.loop import evaluate

from .test_train_and_cli import fake_fashion


@pytest.fixture
def small_fashion(tmp_path, monkeypatch):
    """One batch of the demo's recipes (128 images) and a little more."""
    fake_fashion(tmp_path, monkeypatch, 160)


def test_the_shipped_fp_model_is_well_trained_on_the_real_test_set():
    model = resnet20()
    model.load_state_dict(torch.load(shipped_fp_checkpoint(), weights_only=True))
    result = evaluate(model, torch.utils.data.DataLoader(fashion_mnist("test"), batch_size=1000))
    assert result["top1"] >= 90.0, result


def test_demo_fine_tunes_the_shipped_model_and_ships_it(small_fashion, tmp_path, capsys):
    argv = ["demo", "--recipes", "lsq_w4a4", "--train-images", "128", "--qat-epochs", "1", "--cache", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(shipped_fp_checkpoint()) in out.replace("\n", "")
    assert "lsq_w4a4" in out and "onnxruntime top-1" in out
    assert (tmp_path / "demo_lsq_w4a4.onnx").is_file()
