"""The ``fxquant`` command (also ``python -m fxquant``): demo, summary, recipes, validate.

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
    """``torchvision:NAME`` or ``fxquant:resnet20``."""
    source, _, name = spec.partition(":")
    if source == "torchvision" and name:
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    if source == "fxquant" and name == "resnet20":
        from fxquant.models import resnet20

        return resnet20()
    raise ValueError(f"unknown model {spec!r}; use torchvision:NAME (e.g. torchvision:resnet18) or fxquant:resnet20")


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
    summary.add_argument("--model", required=True, help="torchvision:NAME or fxquant:resnet20")
    summary.add_argument("--recipe", default="lsq_w4a4")
    summary.add_argument("--input", default="1,3,224,224", help="example input shape")
    summary.add_argument("--format", choices=("rich", "text", "markdown"), default="rich")
    summary.set_defaults(func=cmd_summary)

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
