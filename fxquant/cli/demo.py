"""``fxquant demo``: FP resnet20 on Fashion-MNIST (trained once, cached), then QAT at each recipe from it; the
first recipe's model is exported to ONNX and evaluated in onnxruntime."""

from __future__ import annotations

import argparse
import time
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
from fxquant.train.loop import evaluate
from fxquant.workflow import cached_float_model, fit

from .common import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="FP vs QAT resnet20 on real Fashion-MNIST")
    demo.add_argument("--recipes", default="lsq_w4a4,lsq_w2a2")
    demo.add_argument("--train-images", type=positive_int, default=10000, help="training images used (of 60,000)")
    demo.add_argument("--fp-epochs", type=positive_int, default=2)
    demo.add_argument("--qat-epochs", type=positive_int, default=1)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--cache", default=".fxquant_cache")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    torch.manual_seed(args.seed)
    train_data = fashion_mnist("train", augment="standard", limit=args.train_images)
    test_loader = torch.utils.data.DataLoader(fashion_mnist("test"), batch_size=512)
    example = torch.randn(1, 1, 28, 28)
    key = f"resnet20_fp_{args.train_images}_{args.fp_epochs}ep_seed{args.seed}"
    model, fp_seconds = cached_float_model(
        resnet20, key, train_data, args.fp_epochs, args.seed, args.cache, description="FP32 resnet20"
    )
    if not fp_seconds:
        console.print(f"[dim]loaded the FP checkpoint {key} from {args.cache}[/]")
    fp = evaluate(model, test_loader)
    _, fp_totals = collect(prepare_qat(model, "lsq_w8a8", example))
    rows = [("FP32", fp["top1"], fp_totals["bops_fp32"], fp_totals["size_fp32_bytes"], fp_seconds)]
    shipped = None
    for recipe in args.recipes.split(","):
        qmodel = prepare_qat(model, recipe, example)
        start = time.perf_counter()
        fit(qmodel, train_data, None, qmodel.recipe.train.override(epochs=args.qat_epochs), description=f"QAT {recipe}")
        seconds = time.perf_counter() - start
        result = evaluate(qmodel, test_loader)
        _, totals = collect(qmodel)
        rows.append((recipe, result["top1"], totals["bops"], totals["size_bytes"], seconds))
        if shipped is None:  # the first recipe is the one shipped (lsq_w4a4 by default)
            shipped = (recipe, qmodel, result["top1"])
    table = Table(title="fxquant demo · resnet20 · Fashion-MNIST test set (10,000 images)")
    for column in ("model", "top-1 %", "Δ vs FP", "BOPs / image", "size", "train time"):
        table.add_column(column, justify="right")
    for name, top1, bops, size, seconds in rows:
        table.add_row(
            name,
            f"{top1:.2f}",
            f"{top1 - rows[0][1]:+.2f}",
            f"{bops / 1e9:.2f} G",
            f"{size / 1e3:.0f} kB",
            f"{seconds:.0f} s" if seconds else "cached",
        )
    console.print(table)
    if shipped is not None:
        _ship(console, *shipped, Path(args.cache) / f"demo_{shipped[0]}.onnx", example)
    return 0


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
