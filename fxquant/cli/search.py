"""``fxquant search``: per-layer bits by sensitivity under a budget — rich table, PNG bar plot, TOML plan."""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.markup import escape

from fxquant.api import prepare_qat
from fxquant.config.bit_plan import save_plan
from fxquant.config.sections import SearchConfig
from fxquant.data import fashion_mnist, with_channels
from fxquant.search import parse_budget, report, save_bar_plot, search
from fxquant.train.devices import resolve_device
from fxquant.workflow import calibrate

from .common import add_device_argument, load_float_state, model_from_spec, positive_int, shape, widths


def add_parser(sub: argparse._SubParsersAction) -> None:
    find = sub.add_parser("search", help="per-layer bit widths from sharpness under a BOPs or size budget")
    find.add_argument("--model", default="resnet20", help="resnet20, mobilenet_v2_small or torchvision:NAME")
    find.add_argument("--init", help="float state_dict to load first (sensitivity of a trained model)")
    find.add_argument("--recipe", default="lsq_w4a4", help="gives first/last-layer widths and quantizer types")
    find.add_argument("--budget", default="0.25xW8A8", help="0.25xW8A8, 0.5xFP32, avg3, 1.2e9 or size:150kB")
    find.add_argument("--method", choices=("hessian", "sam", "saq"), default="hessian")
    find.add_argument("--iterations", type=positive_int, help="generator iterations (--method saq)")
    find.add_argument("--candidates", type=widths, help="bit widths to choose from (default: the method's)")
    find.add_argument(
        "--search-first-last", action="store_true", help="search the first/last layers' widths too (budget unchanged)"
    )
    find.add_argument("--input", type=shape, default="1,1,28,28", help="example input shape")
    find.add_argument("--data", choices=("fashion-mnist", "random"), default="fashion-mnist")
    find.add_argument("--batches", type=positive_int, default=2)
    find.add_argument("--batch-size", type=positive_int, default=128)
    find.add_argument("--out", default="bit_plan.toml")
    find.add_argument("--plot", default="bit_plan.png")
    add_device_argument(find)
    find.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    model = model_from_spec(args.model)
    if args.init:
        load_float_state(model, args.init, "--init")
    input_shape = args.input
    qmodel = prepare_qat(model, args.recipe, torch.randn(*input_shape, device="cpu")).to(resolve_device(args.device))
    if args.data == "fashion-mnist":
        data = with_channels(fashion_mnist("train", limit=args.batches * args.batch_size), input_shape[1])
        batches = list(torch.utils.data.DataLoader(data, batch_size=args.batch_size))
    else:  # random inputs and labels: shapes and a rough signal only, for models without data here
        classes = model(torch.randn(*input_shape, device="cpu")).shape[-1]  # the float model is on the CPU
        batches = [
            (  # search() moves them to the model
                torch.randn(args.batch_size, *input_shape[1:], device="cpu"),
                torch.randint(0, classes, (args.batch_size,), device="cpu"),
            )
        ] * args.batches
    start = time.perf_counter()
    if args.method == "saq":
        calibrate(qmodel, batches[0][0])
    given = {"iterations": args.iterations, "candidates": tuple(args.candidates) if args.candidates else None}
    config = SearchConfig(
        budget=args.budget,
        method=args.method,
        search_first_last=args.search_first_last,
        **{key: value for key, value in given.items() if value is not None},  # else the section's defaults
    )
    plan, layers = search(qmodel, batches, config, progress=True)
    seconds = time.perf_counter() - start
    report(layers, parse_budget(args.budget, layers), plan, args.method, console)
    comment = (
        f"fxquant search --model {args.model} --recipe {args.recipe} --budget {args.budget} --method {args.method}"
    )
    console.print(f"plan: {save_plan(plan, args.out, comment)}  plot: {save_bar_plot(layers, args.plot)}")
    hint = escape(f'[bits] plan = "{args.out}"')
    console.print(f"search took {seconds:.1f} s; use it with {hint} in a recipe")
    return 0
