"""``fxquant demo``: a well-trained FP resnet20 on Fashion-MNIST (shipped with fxquant, or retrained with
``--retrain-fp``), then QAT at each recipe from it; the first recipe's model is exported to ONNX and evaluated
in onnxruntime."""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fxquant.api import prepare_qat
from fxquant.data import fashion_mnist
from fxquant.deploy import export_onnx, parity
from fxquant.models import resnet20
from fxquant.qat_model import QATModel
from fxquant.summary import collect
from fxquant.train.devices import resolve_device
from fxquant.train.loop import evaluate
from fxquant.workflow import fit

from . import train as train_command
from .common import add_device_argument, load_float_state, positive_int

# How the shipped FP checkpoint was made (`make fp-checkpoint` runs it; `--retrain-fp` runs it again): all 60,000
# training images with standard augmentation, SGD lr 0.1, cosine, 12 epochs, seed 0.
FP_TRAINING = ("train", "--fp", "--model", "resnet20", "--recipe", "lsq_w8a8", "--epochs", "12", "--lr", "0.1")
FP_CHECKPOINT = "resnet20_fashion_mnist.pt"


def shipped_fp_checkpoint() -> Path:
    """The FP resnet20 state_dict that ships with fxquant (see ``fxquant/assets/README.md``)."""
    return Path(str(resources.files("fxquant") / "assets" / FP_CHECKPOINT))


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="FP vs QAT resnet20 on real Fashion-MNIST")
    demo.add_argument("--recipes", default="lsq_w4a4,lsq_w2a2")
    demo.add_argument("--train-images", type=positive_int, default=20000, help="QAT training images (of 60,000)")
    demo.add_argument("--qat-epochs", type=positive_int, default=2)
    demo.add_argument("--fp", help="FP resnet20 state_dict to start from (default: the one shipped with fxquant)")
    demo.add_argument(
        "--retrain-fp", action="store_true", help="retrain the FP model with the shipped one's recorded command first"
    )
    demo.add_argument("--compile", action="store_true", help="train QAT through torch.compile")
    add_device_argument(demo)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--cache", default=".fxquant_cache")
    demo.set_defaults(func=run)


def _float_model(args: argparse.Namespace, console: Console) -> tuple[torch.nn.Module, str, float]:
    """(FP resnet20, where it came from, seconds spent training it here)."""
    path, seconds = Path(args.fp) if args.fp else shipped_fp_checkpoint(), 0.0
    if args.retrain_fp:
        path = Path(args.cache) / FP_CHECKPOINT
        command = [*FP_TRAINING, "--seed", str(args.seed), "--out", str(path)]
        console.print(f"retraining the FP model: fxquant {' '.join(command)}")
        parser = argparse.ArgumentParser(prog="fxquant")
        train_command.add_parser(parser.add_subparsers())
        start = time.perf_counter()
        train_command.run(parser.parse_args(command))
        seconds = time.perf_counter() - start
    model = resnet20()
    load_float_state(model, str(path), "--fp")
    return model, str(path), seconds


def run(args: argparse.Namespace) -> int:
    console = Console()
    device = resolve_device(args.device)  # a GPU when there is one, unless told otherwise
    console.print(f"fxquant demo on {_describe(device)}")
    torch.manual_seed(args.seed)
    model, source, fp_seconds = _float_model(args, console)
    train_data = fashion_mnist("train", augment="standard", limit=args.train_images)
    test_loader = torch.utils.data.DataLoader(fashion_mnist("test"), batch_size=512)
    example = torch.randn(1, 1, 28, 28, device="cpu")  # prepared on the CPU; fit moves the model
    fp = evaluate(model, test_loader)
    console.print(f"[dim]FP32 resnet20 from {source}[/]")
    _, fp_totals = collect(prepare_qat(model, "lsq_w8a8", example))
    rows = [("FP32", fp["top1"], fp_totals["bops_fp32"], fp_totals["size_fp32_bytes"], fp_seconds, None)]
    shipped = None
    for recipe in args.recipes.split(","):
        qmodel = prepare_qat(model, recipe, example)
        start = time.perf_counter()
        config = qmodel.recipe.train.override(epochs=args.qat_epochs)
        history = fit(
            qmodel, train_data, None, config, description=f"QAT {recipe}", compile=args.compile or None, device=device
        )
        seconds = time.perf_counter() - start
        result = evaluate(qmodel, test_loader)
        _, totals = collect(qmodel)
        speed = history[-1].images_per_second
        rows.append((recipe, result["top1"], totals["bops"], totals["size_bytes"], seconds, speed))
        if shipped is None:  # the first recipe is the one shipped (lsq_w4a4 by default)
            shipped = (recipe, qmodel, result["top1"])
    title = (
        f"fxquant demo · resnet20 · Fashion-MNIST test set (10,000 images) · QAT: {args.qat_epochs} epochs "
        f"on {args.train_images:,} images from the FP model · {_describe(device)}"
    )
    table = Table(title=title)
    for column in ("model", "top-1 %", "Δ vs FP", "BOPs / image", "size", "train time", "images/s"):
        table.add_column(column, justify="right")
    for name, top1, bops, size, seconds, speed in rows:
        table.add_row(
            name,
            f"{top1:.2f}",
            f"{top1 - rows[0][1]:+.2f}",
            f"{bops / 1e9:.2f} G",
            f"{size / 1e3:.0f} kB",
            f"{seconds:.0f} s" if seconds else "shipped",
            f"{speed:.0f}" if speed else "",
        )
    console.print(table)
    if shipped is not None:
        _ship(console, *shipped, Path(args.cache) / f"demo_{shipped[0]}.onnx", example)
    return 0


def _describe(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` or ``cpu (2 threads)``: where the demo ran."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def _ship(
    console: Console, recipe: str, qmodel: QATModel, torch_top1: float, path: Path, example: torch.Tensor
) -> None:
    """Export the model to ONNX and measure its accuracy in onnxruntime on the same 10,000 test images."""
    report = export_onnx(qmodel, path, example)
    test = fashion_mnist("test")
    sess = parity.session(report.path, "enable_all")
    correct = 0
    for x, y in torch.utils.data.DataLoader(test, batch_size=1000):
        correct += int((torch.from_numpy(parity.run(sess, (x,))).argmax(1) == y).sum())
    console.print(
        f"shipped {recipe} as {report.path} ({report.bytes / 1e3:.0f} kB, QDQ opset {report.opset}): "
        f"onnxruntime top-1 {100 * correct / len(test):.2f}% · PyTorch top-1 {torch_top1:.2f}%"
    )
