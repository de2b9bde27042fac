"""Sharpness: LSQ vs SAQ, and uniform widths vs searched per-layer plans at equal BOPs, on Fashion-MNIST.

Rows: lsq vs saq at W4A4 and W2A2; uniform lsq_w3a3 / lsq_w2a2 vs plans searched by Hessian trace, SAM loss
increase and SAQ's generator at the same BOPs (``avg3`` / ``avg2``: the uniform recipe's BOPs, first/last layers
at 8 bits), each then trained with plain LSQ so that only the plan differs. Every run starts from the same FP
checkpoint (benchmarks/accuracy.py's quick preset) and trains the same epochs on the same data.

    python benchmarks/sharpness.py [--epochs 1] [--budgets avg3,avg2] [--threads 2] [--seeds 0,1]
    python benchmarks/sharpness.py --only-budgets --search-first-last --methods hessian,sam,saq

Writes benchmarks/results/sharpness.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxquant
from fxquant import evaluate, fit
from fxquant.summary import collect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESETS, mean_std, quick_setup, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--budgets", default="avg3,avg2")
    parser.add_argument("--methods", default="hessian,sam,saq")
    parser.add_argument("--saq-iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only-plans", action="store_true", help="run the searched-plan rows only")
    parser.add_argument(
        "--only-budgets", action="store_true", help="run the uniform and searched-plan rows of the budgets only"
    )
    parser.add_argument(
        "--search-first-last", action="store_true", help="plans may change the first/last layers' widths too"
    )
    parser.add_argument("--seeds", default="0", help="QAT seeds (the FP checkpoint is seed 0's); mean ± std rows")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, fp, test, fp_top1 = quick_setup()
    example = torch.randn(1, 1, 28, 28)
    runs: list[tuple[str, str | dict]] = [
        ("LSQ W4A4", "lsq_w4a4"),
        ("SAQ W4A4", "saq_w4a4"),
        ("LSQ W2A2", "lsq_w2a2"),
        ("SAQ W2A2", "saq_w2a2"),
    ]
    budget_rows = set()  # the uniform and plan rows of the budgets
    for budget in args.budgets.split(","):
        bits = budget.removeprefix("avg")
        uniform = f"lsq_w{bits}a{bits}"
        if (f"LSQ W{bits}A{bits}", uniform) in runs:
            budget_rows.add(f"LSQ W{bits}A{bits}")
        else:
            runs.append((f"uniform W{bits}A{bits}", uniform))
            budget_rows.add(runs[-1][0])
        for method in args.methods.split(","):
            search = {"method": method, "budget": budget, "batches": 4 if method == "saq" else 2}
            if args.search_first_last:
                search["search_first_last"] = True
            if method == "saq":
                search["iterations"] = args.saq_iterations
            # the plan's training table is the uniform recipe's of the same budget: only the widths differ
            label = f"{method} plan @ {budget}" + (" (first/last searched)" if args.search_first_last else "")
            runs.append((label, {"extends": uniform, "search": search}))
            budget_rows.add(label)
    if args.only_plans:
        runs = [(label, recipe) for label, recipe in runs if isinstance(recipe, dict)]
    elif args.only_budgets:
        runs = [(label, recipe) for label, recipe in runs if label in budget_rows]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed, (label, recipe) in ((seed, run) for seed in seeds for run in runs):
        torch.manual_seed(seed)
        qmodel = fxquant.prepare_qat(fp, recipe, example)
        start = time.perf_counter()
        config = qmodel.recipe.train.override(epochs=args.epochs)
        history = fit(qmodel, train, None, config, description=f"{label} seed {seed}", seed=seed)
        seconds = time.perf_counter() - start
        _, totals = collect(qmodel)
        searched = qmodel.bit_plan if qmodel.recipe.search is not None else None
        rows.append(
            {
                "run": label,
                "seed": seed,
                "top1": evaluate(qmodel, test)["top1"],
                "gbops": totals["bops"] / 1e9,
                "seconds": seconds,
                "img_per_s": history[-1].images_per_second,
                "plan_widths": sorted({w for w, _ in searched.values()}) if searched else None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    table_rows = []
    for label, _ in runs:  # one row per run, mean ± std over the seeds
        mine = [r for r in rows if r["run"] == label]
        top1 = [r["top1"] for r in mine]
        widths = sorted({w for r in mine for w in (r["plan_widths"] or ())})
        table_rows.append(
            [label, mean_std(top1), mean_std([t - fp_top1 for t in top1]), mean_std([r["gbops"] for r in mine], 4),
             f"{statistics.mean(r['seconds'] for r in mine):.0f} s", ",".join(map(str, widths)) or "uniform"]
        )  # fmt: skip
    table = tabulate(
        table_rows,
        headers=["run", "top-1 %", "Δ vs FP", "GBOPs / image", "time (search + training)", "widths used"],
        tablefmt="github",
        disable_numparse=True,
    )
    text = (
        "# Sharpness: LSQ vs SAQ, uniform vs searched bit widths · Fashion-MNIST resnet20\n\n"
        f"{torch.get_num_threads()} threads. FP top-1 "
        f"{fp_top1:.2f}% (accuracy.py quick checkpoint); every run {args.epochs} epoch(s) of QAT on "
        f"{PRESETS['quick']['train_images']} images from it; QAT seeds {args.seeds} (mean ± std when several). "
        "Searched plans are trained with plain LSQ (no SAM) so that only the widths differ from the uniform row at "
        "the same budget"
        + (
            "; they may change the first/last layers' widths too (the budget counts them at 8 bits)"
            if args.search_first_last
            else ""
        )
        + ".\n\n"
        f"{table}\n"
    )
    stem = "sharpness" + (f"_{args.tag}" if args.tag else "")
    write_results(stem, text, {"fp_top1": fp_top1, "rows": rows})


if __name__ == "__main__":
    main()
