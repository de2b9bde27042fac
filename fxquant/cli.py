"""The ``fxquant`` command (also ``python -m fxquant``): demo, train, zeroshot, summary, recipes, validate.

Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

EXIT_USAGE = 2


def _model_from_spec(spec: str) -> torch.nn.Module:
    """``torchvision:NAME``, ``resnet20``/``mobilenet_v2_small`` (also with an ``fxquant:`` prefix)."""
    from fxquant.models import build

    return build(spec)


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--input must be comma-separated integers like 1,3,224,224, got {text!r}") from None


def cmd_summary(args: argparse.Namespace) -> int:
    import fxquant

    model = _model_from_spec(args.model)
    qmodel = fxquant.prepare_qat(model, args.recipe, torch.randn(*_shape(args.input)))
    text = fxquant.summary(qmodel, format=args.format)
    if args.format != "rich":
        print(text)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    import fxquant

    table = Table(title="built-in recipes")
    for column in ("name", "W bits", "A bits", "description"):
        table.add_column(column)
    for name in fxquant.builtin_names():
        recipe = fxquant.load_recipe(name)
        table.add_row(name, str(recipe.quant.weight.bits), str(recipe.quant.activation.bits), recipe.description)
    Console().print(table)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    import fxquant

    recipe = fxquant.load_recipe(args.file)
    print(f"{args.file}: valid recipe '{recipe.name}' (W{recipe.quant.weight.bits}A{recipe.quant.activation.bits})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """FP resnet20 on Fashion-MNIST (checkpoint cached), then QAT at each recipe from it; a table at the end."""
    from rich.console import Console
    from rich.table import Table

    import fxquant
    from fxquant.data import fashion_mnist
    from fxquant.models import resnet20
    from fxquant.summary import collect
    from fxquant.train import evaluate, fit

    console = Console()
    torch.manual_seed(args.seed)
    train_data = fashion_mnist("train", augment="standard", limit=args.train_images)
    test_data = fashion_mnist("test")
    test_loader = torch.utils.data.DataLoader(test_data, batch_size=512)
    example = torch.randn(1, 1, 28, 28)
    cache = Path(args.cache) / f"resnet20_fp_{args.train_images}_{args.fp_epochs}ep_seed{args.seed}.pt"
    model = resnet20()
    rows = []
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
        console.print(f"[dim]loaded the FP checkpoint from {cache}[/]")
        fp_seconds = 0.0
    else:
        start = time.perf_counter()
        fit(
            model,
            train_data,
            None,
            {"epochs": args.fp_epochs, "lr": 0.1, "weight_decay": 5e-4},
            description="FP32 resnet20",
        )
        fp_seconds = time.perf_counter() - start
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    fp = evaluate(model, test_loader)
    fp_q = fxquant.prepare_qat(model, "lsq_w8a8", example)
    _, fp_totals = collect(fp_q)
    rows.append(("FP32", fp["top1"], fp_totals["bops_fp32"], fp_totals["size_fp32_bytes"], fp_seconds))
    for recipe in args.recipes.split(","):
        qmodel = fxquant.prepare_qat(model, recipe, example)
        config = {**qmodel.recipe.train, "epochs": args.qat_epochs}
        start = time.perf_counter()
        fit(qmodel, train_data, None, config, description=f"QAT {recipe}")
        seconds = time.perf_counter() - start
        result = evaluate(qmodel, test_loader)
        _, totals = collect(qmodel)
        rows.append((recipe, result["top1"], totals["bops"], totals["size_bytes"], seconds))
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
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """QAT (or, with --fp, float training) of a model on Fashion-MNIST with a recipe's [train] table."""
    from rich.console import Console

    import fxquant
    from fxquant.data import fashion_mnist
    from fxquant.train import evaluate, fit

    torch.manual_seed(args.seed)
    info = fxquant.distributed.setup()
    console = Console(quiet=not info.is_main)
    model = _model_from_spec(args.model)
    if args.init:
        _load_float_state(model, args.init, "--init")
    channels = _input_channels(model)
    train_data = _with_channels(fashion_mnist("train", augment=args.augment, limit=args.train_images), channels)
    test_data = _with_channels(fashion_mnist("test"), channels)
    recipe = fxquant.load_recipe(args.recipe)
    config = {**recipe.train, **{k: v for k, v in _train_overrides(args).items() if v is not None}}
    example = torch.randn(1, channels, 28, 28)
    target = model if args.fp else fxquant.prepare_qat(model, recipe, example)
    label = f"FP32 {args.model}" if args.fp else f"QAT {recipe.name}"
    start = time.perf_counter()
    history = fit(target, train_data, test_data, config, description=label, seed=args.seed)
    seconds = time.perf_counter() - start
    final = history[-1]
    if args.out and info.is_main:
        if args.fp:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), args.out)
        else:
            fxquant.save(target, args.out, extra={"epochs": config["epochs"], "test_top1": final.test_top1})
        console.print(f"saved {args.out}")
    if args.init and not args.fp:
        loader = torch.utils.data.DataLoader(test_data, batch_size=512)
        console.print(f"FP32 from {args.init}: top-1 {evaluate(model, loader)['top1']:.2f}%")
    console.print(
        f"{label}: test top-1 {final.test_top1:.2f}% after {config['epochs']} epochs "
        f"({seconds:.0f} s, {final.images_per_second:.0f} img/s, {info.world_size} process(es))"
    )
    return 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    """Zero-shot QAT of a trained float model: no training data, images synthesised from the model."""
    from rich.console import Console

    import fxquant
    from fxquant.data import DataNotFoundError, fashion_mnist
    from fxquant.train import evaluate

    console = Console()
    model = _model_from_spec(args.arch)
    _load_float_state(model, args.model, "--model")
    qmodel = fxquant.prepare_qat(model, args.recipe)
    overrides = {k: v for k, v in {"iterations": args.iterations, "seed": args.seed}.items() if v is not None}
    channels = _input_channels(model)
    result = fxquant.zeroshot.train(qmodel, overrides, image_shape=(channels, 28, 28))
    grid = fxquant.zeroshot.save_grid(result.generator, args.grid)
    console.print(f"synthetic samples (one row per class): {grid}")
    if args.out:
        fxquant.save(qmodel, args.out, extra={"zeroshot_iterations": len(result.history)})
        console.print(f"saved {args.out}")
    try:  # evaluation only: zero-shot training never reads real data
        test = torch.utils.data.DataLoader(_with_channels(fashion_mnist("test"), channels), batch_size=512)
    except DataNotFoundError:
        console.print(f"zero-shot {qmodel.recipe.name}: done in {result.seconds:.0f} s (no test set to evaluate on)")
        return 0
    fp, quant = evaluate(model, test)["top1"], evaluate(qmodel, test)["top1"]
    console.print(
        f"Fashion-MNIST test top-1: FP32 {fp:.2f}% → zero-shot {qmodel.recipe.name} {quant:.2f}% "
        f"({len(result.history)} iterations, {result.seconds:.0f} s)"
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Per-layer bits by sensitivity under a budget: rich table, PNG bar plot, TOML plan."""
    from rich.console import Console
    from rich.markup import escape

    import fxquant
    from fxquant import search
    from fxquant.data import fashion_mnist

    console = Console()
    model = _model_from_spec(args.model)
    if args.init:
        _load_float_state(model, args.init, "--init")
    shape = _shape(args.input)
    qmodel = fxquant.prepare_qat(model, args.recipe, torch.randn(*shape))
    if args.data == "fashion-mnist":
        data = _with_channels(fashion_mnist("train", limit=args.batches * args.batch_size), shape[1])
        batches = list(torch.utils.data.DataLoader(data, batch_size=args.batch_size))
    else:  # random inputs and labels: shapes and a rough signal only, for models without data here
        classes = qmodel(torch.randn(*shape)).shape[-1]
        batches = [
            (torch.randn(args.batch_size, *shape[1:]), torch.randint(0, classes, (args.batch_size,)))
        ] * args.batches
    start = time.perf_counter()
    if args.method == "saq":
        fxquant.distributed.initialize_quantizers(qmodel, batches[0][0])
    plan, layers = search.search(
        qmodel,
        batches,
        args.budget,
        args.method,
        [int(b) for b in args.candidates.split(",")],
        progress=True,
        iterations=args.iterations,
        search_first_last=args.search_first_last,
    )
    seconds = time.perf_counter() - start
    budget = search.parse_budget(args.budget, layers)
    search.report(layers, budget, plan, args.method, console)
    comment = (
        f"fxquant search --model {args.model} --recipe {args.recipe} --budget {args.budget} --method {args.method}"
    )
    console.print(f"plan: {search.save_plan(plan, args.out, comment)}  plot: {search.save_bar_plot(layers, args.plot)}")
    hint = escape(f'[bits] plan = "{args.out}"')
    console.print(f"search took {seconds:.1f} s; use it with {hint} in a recipe")
    return 0


def _load_float_state(model: torch.nn.Module, path: str, option: str) -> None:
    """Load a float state_dict; an fxquant checkpoint here is a one-line error, not a key mismatch."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "format" in state:
        raise ValueError(f"{option} {path} is an fxquant checkpoint; {option} takes a float state_dict")
    model.load_state_dict(state)


def _input_channels(model: torch.nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return first.in_channels if first is not None else 1


def _with_channels(data, channels: int):
    if channels == 1:
        return data
    if channels != 3:
        raise ValueError(
            f"the model's first convolution takes {channels} channels; Fashion-MNIST gives 1 (or 3 repeated)"
        )
    return _RepeatChannels(data)


class _RepeatChannels(torch.utils.data.Dataset):
    """Grayscale images repeated to 3 channels, for torchvision models."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return x.expand(3, -1, -1), y


def _train_overrides(args: argparse.Namespace) -> dict:
    return {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxquant", description="Quantization-aware training by graph rewriting.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="FP vs QAT resnet20 on real Fashion-MNIST")
    demo.add_argument("--recipes", default="lsq_w4a4,lsq_w2a2")
    demo.add_argument("--train-images", type=int, default=10000, help="training images used (of 60,000)")
    demo.add_argument("--fp-epochs", type=int, default=2)
    demo.add_argument("--qat-epochs", type=int, default=1)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--cache", default=".fxquant_cache")
    demo.set_defaults(func=cmd_demo)

    summary = sub.add_parser("summary", help="prepare a model and print its per-layer summary")
    summary.add_argument("--model", required=True, help="torchvision:NAME, resnet20 or mobilenet_v2_small")
    summary.add_argument("--recipe", default="lsq_w4a4")
    summary.add_argument("--input", default="1,3,224,224", help="example input shape")
    summary.add_argument("--format", choices=("rich", "text", "markdown"), default="rich")
    summary.set_defaults(func=cmd_summary)

    train = sub.add_parser(
        "train",
        help="train a model on Fashion-MNIST with a recipe (QAT, or float with --fp); works under torchrun",
    )
    train.add_argument("--model", default="resnet20", help="resnet20, mobilenet_v2_small or torchvision:NAME")
    train.add_argument("--recipe", default="lsq_w4a4", help="built-in name or TOML path ([train] gives epochs, lr...)")
    train.add_argument("--init", help="float state_dict to start from (e.g. from fxquant train --fp --out ...)")
    train.add_argument("--fp", action="store_true", help="train the float model (the recipe's [train] table only)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int, help="global batch (split across torchrun ranks)")
    train.add_argument("--lr", type=float)
    train.add_argument("--augment", choices=("none", "standard", "strong"), default="standard")
    train.add_argument("--train-images", type=int, help="use only the first N training images")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", help="where to save (an fxquant checkpoint; a float state_dict with --fp)")
    train.set_defaults(func=cmd_train)

    find = sub.add_parser("search", help="per-layer bit widths from sharpness under a BOPs or size budget")
    find.add_argument("--model", default="resnet20", help="resnet20, mobilenet_v2_small or torchvision:NAME")
    find.add_argument("--init", help="float state_dict to load first (sensitivity of a trained model)")
    find.add_argument("--recipe", default="lsq_w4a4", help="gives first/last-layer widths and quantizer types")
    find.add_argument("--budget", default="0.25xW8A8", help="0.25xW8A8, 0.5xFP32, avg3, 1.2e9 or size:150kB")
    find.add_argument("--method", choices=("hessian", "sam", "saq"), default="hessian")
    find.add_argument("--iterations", type=int, default=100, help="generator iterations (--method saq)")
    find.add_argument("--candidates", default="2,3,4,8")
    find.add_argument(
        "--search-first-last", action="store_true", help="search the first/last layers' widths too (budget unchanged)"
    )
    find.add_argument("--input", default="1,1,28,28", help="example input shape")
    find.add_argument("--data", choices=("fashion-mnist", "random"), default="fashion-mnist")
    find.add_argument("--batches", type=int, default=2)
    find.add_argument("--batch-size", type=int, default=128)
    find.add_argument("--out", default="bit_plan.toml")
    find.add_argument("--plot", default="bit_plan.png")
    find.set_defaults(func=cmd_search)

    zeroshot = sub.add_parser("zeroshot", help="quantize a trained float model with no data (LRQ)")
    zeroshot.add_argument("--model", required=True, help="float state_dict, e.g. from fxquant train --fp --out")
    zeroshot.add_argument("--arch", default="resnet20", help="architecture of that state_dict")
    zeroshot.add_argument("--recipe", default="lrq_w4a4")
    zeroshot.add_argument("--iterations", type=int, help="override the recipe's [zeroshot] iterations")
    zeroshot.add_argument("--seed", type=int)
    zeroshot.add_argument("--grid", default="zeroshot_samples.png", help="PNG grid of synthetic samples")
    zeroshot.add_argument("--out", help="save the quantized model (an fxquant checkpoint)")
    zeroshot.set_defaults(func=cmd_zeroshot)

    recipes = sub.add_parser("recipes", help="list the built-in recipes")
    recipes.set_defaults(func=cmd_recipes)

    validate = sub.add_parser("validate", help="check a recipe file")
    validate.add_argument("file")
    validate.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fxquant`` command."""
    from fxquant.errors import FxQuantError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FxQuantError, ValueError, FileNotFoundError) as err:
        print(f"fxquant {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fxquant {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
