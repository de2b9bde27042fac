"""``fxquant train``: QAT (or, with --fp, float training) of a model on Fashion-MNIST; works under torchrun."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console

from fxquant.api import prepare_qat
from fxquant.checkpoint import save
from fxquant.config import load_recipe
from fxquant.config.sections import PRECISIONS
from fxquant.data import fashion_mnist, with_channels
from fxquant.train import distributed
from fxquant.train.devices import model_device
from fxquant.train.loop import evaluate
from fxquant.workflow import fit

from .common import add_device_argument, input_channels, load_float_state, model_from_spec, positive_float, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train a model on Fashion-MNIST with a recipe (QAT, or float with --fp); works under torchrun",
    )
    train.add_argument("--model", default="resnet20", help="resnet20, mobilenet_v2_small or torchvision:NAME")
    train.add_argument("--recipe", default="lsq_w4a4", help="built-in name or TOML path ([train] gives epochs, lr...)")
    train.add_argument("--init", help="float state_dict to start from (e.g. from fxquant train --fp --out ...)")
    train.add_argument("--fp", action="store_true", help="train the float model (the recipe's [train] table only)")
    train.add_argument("--epochs", type=positive_int)
    train.add_argument("--batch-size", type=positive_int, help="global batch (split across torchrun ranks)")
    train.add_argument("--lr", type=positive_float)
    train.add_argument("--augment", choices=("none", "standard", "strong"), default="standard")
    train.add_argument("--train-images", type=positive_int, help="use only the first N training images")
    train.add_argument("--compile", action="store_true", help="train through torch.compile (after calibration)")
    train.add_argument("--precision", choices=PRECISIONS, help="fp32, bf16 or fp16 (default: the recipe's [train])")
    add_device_argument(train)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", help="where to save (an fxquant checkpoint; a float state_dict with --fp)")
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    info = distributed.setup()
    console = Console(quiet=not info.is_main)
    model = model_from_spec(args.model)
    if args.init:
        load_float_state(model, args.init, "--init")
    recipe = load_recipe(args.recipe)  # a bad recipe fails before the data is read
    channels = input_channels(model)
    train_data = with_channels(fashion_mnist("train", augment=args.augment, limit=args.train_images), channels)
    test_data = with_channels(fashion_mnist("test"), channels)
    changes = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "compile": args.compile or None,
        "precision": args.precision,
    }
    config = recipe.train.override(**{k: v for k, v in changes.items() if v is not None})
    target = model if args.fp else prepare_qat(model, recipe, torch.randn(1, channels, 28, 28, device="cpu"))
    label = f"FP32 {args.model}" if args.fp else f"QAT {recipe.name}"
    start = time.perf_counter()
    history = fit(target, train_data, test_data, config, description=label, seed=args.seed, device=args.device)
    seconds = time.perf_counter() - start
    final = history[-1]
    if args.out and info.is_main:
        if args.fp:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), args.out)
        else:
            save(target, args.out, extra={"epochs": config.epochs, "test_top1": final.test_top1})
        console.print(f"saved {args.out}")
    if args.init and not args.fp:
        loader = torch.utils.data.DataLoader(test_data, batch_size=512)
        console.print(f"FP32 from {args.init}: top-1 {evaluate(model, loader)['top1']:.2f}%")
    console.print(
        f"{label}: test top-1 {final.test_top1:.2f}% after {config.epochs} epochs "
        f"({seconds:.0f} s, {final.images_per_second:.0f} img/s, {info.world_size} process(es) on "
        f"{model_device(target)}, {config.precision})"
    )
    return 0
