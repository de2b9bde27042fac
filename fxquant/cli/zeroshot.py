"""``fxquant zeroshot``: quantize a trained float model with no training data (LRQ)."""

from __future__ import annotations

import argparse

import torch
from rich.console import Console

from fxquant.api import prepare_qat
from fxquant.checkpoint import save
from fxquant.data import DataNotFoundError, fashion_mnist, with_channels
from fxquant.train.devices import resolve_device
from fxquant.train.loop import evaluate
from fxquant.zeroshot import save_grid, train

from .common import add_device_argument, input_channels, load_float_state, model_from_spec, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    zeroshot = sub.add_parser("zeroshot", help="quantize a trained float model with no data (LRQ)")
    zeroshot.add_argument("--model", required=True, help="float state_dict, e.g. from fxquant train --fp --out")
    zeroshot.add_argument("--arch", default="resnet20", help="architecture of that state_dict")
    zeroshot.add_argument("--recipe", default="lrq_w4a4")
    zeroshot.add_argument("--iterations", type=positive_int, help="override the recipe's [zeroshot] iterations")
    zeroshot.add_argument("--seed", type=int)
    zeroshot.add_argument("--grid", default="zeroshot_samples.png", help="PNG grid of synthetic samples")
    zeroshot.add_argument("--out", help="save the quantized model (an fxquant checkpoint)")
    add_device_argument(zeroshot)
    zeroshot.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    model = model_from_spec(args.arch)
    load_float_state(model, args.model, "--model")
    qmodel = prepare_qat(model, args.recipe).to(resolve_device(args.device))
    overrides = {k: v for k, v in {"iterations": args.iterations, "seed": args.seed}.items() if v is not None}
    channels = input_channels(model)
    result = train(qmodel, overrides, image_shape=(channels, 28, 28))
    console.print(f"synthetic samples (one row per class): {save_grid(result.generator, args.grid)}")
    if args.out:
        save(qmodel, args.out, extra={"zeroshot_iterations": len(result.history)})
        console.print(f"saved {args.out}")
    try:  # evaluation only: zero-shot training never reads real data
        test = torch.utils.data.DataLoader(with_channels(fashion_mnist("test"), channels), batch_size=512)
    except DataNotFoundError:
        console.print(f"zero-shot {qmodel.recipe.name}: done in {result.seconds:.0f} s (no test set to evaluate on)")
        return 0
    fp, quant = evaluate(model, test)["top1"], evaluate(qmodel, test)["top1"]
    console.print(
        f"Fashion-MNIST test top-1: FP32 {fp:.2f}% → zero-shot {qmodel.recipe.name} {quant:.2f}% "
        f"({len(result.history)} iterations, {result.seconds:.0f} s)"
    )
    return 0
