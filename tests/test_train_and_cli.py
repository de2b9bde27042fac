"""Data reading, the training step, evaluation, and the CLI's contract (one-line errors, exit codes)."""

import gzip

import pytest
import torch

import fxquant
from fxquant.cli import main
from fxquant.config import TrainConfig
from fxquant.data import DataNotFoundError, fashion_mnist, read_idx
from fxquant.models import resnet20
from fxquant.train import TrainStep, evaluate, make_optimizer, parameter_groups


def write_idx(path, array: torch.Tensor):
    header = bytes([0, 0, 8, array.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def fake_fashion(folder, monkeypatch, count: int) -> torch.Tensor:
    """``count`` easy images (class k is brightness 25·k plus noise) as Fashion-MNIST's IDX files in ``folder``,
    which FXQUANT_DATA then points at; returns the labels."""
    torch.manual_seed(0)
    labels = torch.arange(count) % 10
    images = (labels[:, None, None] * 25 + torch.randint(0, 5, (count, 28, 28))).clamp(0, 255)
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("FXQUANT_DATA", str(folder))
    return labels


@pytest.fixture
def tiny_fashion(tmp_path, monkeypatch):
    return tmp_path, fake_fashion(tmp_path, monkeypatch, 40)


def test_idx_reader_and_dataset(tiny_fashion):
    folder, labels = tiny_fashion
    data = fashion_mnist("train", root=None, augment="strong", limit=20)
    x, y = data[3]
    assert x.shape == (1, 28, 28) and int(y) == 3 and len(data) == 20
    assert torch.equal(read_idx(folder / "train-labels-idx1-ubyte.gz"), labels)


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQUANT_DATA", str(tmp_path))
    monkeypatch.setattr("fxquant.data.DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist("test")


def test_quantizer_parameters_get_their_own_group_without_decay():
    qmodel = fxquant.prepare_qat(resnet20(), "lsq_w4a4")
    qmodel(torch.randn(2, 1, 28, 28))
    groups = {g["name"]: g for g in parameter_groups(qmodel, 0.1, 1e-4, quantizer_lr=0.01)}
    assert groups["quantizers"]["weight_decay"] == 0 and groups["quantizers"]["lr"] == 0.01
    quantizer_params = sum(p.numel() for q in qmodel.quantizers().values() for p in q.parameters())
    assert sum(p.numel() for p in groups["quantizers"]["params"]) == quantizer_params


def test_train_step_learns_a_separable_toy_problem():
    torch.manual_seed(0)
    qmodel = fxquant.prepare_qat(
        torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)), "lsq_w4a4"
    )
    x = torch.randn(256, 4)
    y = (x[:, 0] > 0).long()
    step = TrainStep(qmodel, make_optimizer(qmodel, TrainConfig(lr=0.1, optimizer="sgd")))
    first = step(x, y)
    for _ in range(150):
        last = step(x, y)
    assert last["loss"] < first["loss"] * 0.5
    assert evaluate(qmodel, [(x, y)])["top1"] > 90


def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[quant]\nweight = { bitz = 3 }\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "quant.weight.bitz" in err and "did you mean 'bits'" in err
    assert main(["summary", "--model", "keras:resnet", "--input", "1,3,32,32"]) == 2


def test_cli_summary_and_recipes(capsys):
    assert main(["summary", "--model", "fxquant:resnet20", "--input", "1,1,28,28", "--format", "text"]) == 0
    assert "conv1 [first]" in capsys.readouterr().out
    assert main(["recipes"]) == 0
    assert "lsq_w4a4" in capsys.readouterr().out


def test_cli_train_fp_then_qat_then_reload(tiny_fashion, tmp_path, capsys):
    fp_path, q_path = tmp_path / "fp.pt", tmp_path / "q.pt"
    common = ["--model", "resnet20", "--epochs", "1", "--batch-size", "8", "--augment", "none"]
    assert main(["train", "--fp", *common, "--out", str(fp_path)]) == 0
    assert main(["train", *common, "--recipe", "lsq_w4a4", "--init", str(fp_path), "--out", str(q_path)]) == 0
    out = capsys.readouterr().out
    assert "FP32 resnet20: test top-1" in out and "QAT lsq_w4a4: test top-1" in out
    qmodel = fxquant.load(q_path, resnet20())
    assert qmodel.recipe.name == "lsq_w4a4"
    assert fxquant.checkpoint.read(q_path)["extra"]["epochs"] == 1
    # an fxquant checkpoint is not a float init: one clear line
    assert main(["train", *common, "--init", str(q_path)]) == 2
    assert "float state_dict" in capsys.readouterr().err


def test_fit_history_and_global_batch(tiny_fashion):
    qmodel = fxquant.prepare_qat(resnet20(), "lsq_w4a4")
    data = fashion_mnist("train")
    history = fxquant.fit(qmodel, data, data, {"epochs": 2, "batch_size": 8, "lr": 0.01}, progress=False)
    assert [h.epoch for h in history] == [1, 2]
    assert all(0 <= h.test_top1 <= 100 and h.images_per_second > 0 for h in history)
    assert all(q.is_initialized for q in qmodel.quantizers().values())


def test_a_seeded_run_does_not_depend_on_what_ran_before_in_the_process(tiny_fashion):
    """Benchmarks run many recipes in one process: each must see the same augmented batches for its seed."""
    data = fashion_mnist("train", augment="strong")

    def run(recipe):
        torch.manual_seed(0)
        qmodel = fxquant.prepare_qat(resnet20(), recipe)
        fxquant.fit(qmodel, data, None, {"epochs": 1, "batch_size": 8, "lr": 0.01}, progress=False)
        return torch.cat([p.detach().flatten() for p in qmodel.parameters()])

    first = run("lsq_w4a4")
    run("lsq_w2a2")
    assert torch.equal(run("lsq_w4a4"), first)
    torch.manual_seed(1)
    assert not torch.equal(data[0][0], data[0][0]), "two reads of one image are two augmentations"


def test_fit_stops_with_a_clear_error_when_the_loss_diverges():
    from fxquant.errors import FxQuantError

    x = torch.randn(16, 1, 28, 28)
    x[3, 0, 5, 5] = float("inf")  # one bad pixel: the loss is not finite from the first step
    data = torch.utils.data.TensorDataset(x, torch.arange(16) % 10)
    qmodel = fxquant.prepare_qat(resnet20(), "lsq_w4a4")
    with pytest.raises(FxQuantError, match=r"training diverged: the loss is nan by epoch 1, step 1.*init = \"mse\""):
        fxquant.fit(qmodel, data, None, {"epochs": 1, "batch_size": 16}, progress=False)


def test_cli_zeroshot_runs_without_training_data(tiny_fashion, tmp_path, capsys):
    fp_path = tmp_path / "fp.pt"
    torch.save(resnet20().state_dict(), fp_path)
    grid = tmp_path / "grid.png"
    args = ["zeroshot", "--model", str(fp_path), "--recipe", "lrq_w4a4", "--iterations", "2", "--grid", str(grid)]
    assert main([*args, "--out", str(tmp_path / "q.pt")]) == 0
    assert grid.is_file() and (tmp_path / "q.pt").is_file()
    assert "zero-shot lrq_w4a4" in capsys.readouterr().out
