"""Accuracy table: FP vs QAT recipes on real Fashion-MNIST, every QAT run fine-tuned from the same FP checkpoint.

This is the table every method adds rows to: a row is a recipe (``lsq_w4a4``, later ``cr_w2a2``, ``saq_w4a4``...),
trained with the same data, epochs and seeds, so rows differ only by what the recipe declares.

    python benchmarks/accuracy.py --quick                       # ≤ 15 min on 2 cores
    python benchmarks/accuracy.py                               # full preset
    python benchmarks/accuracy.py --quick --recipes lsq_w2a2 --seeds 0,1,2 --model mobilenet_v2_small

The FP checkpoint is cached under .fxquant_cache/ (keyed by model, preset and seed). Writes
benchmarks/results/accuracy_<model>_<preset>.md and .json; the JSON keeps every run, so tables can be merged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import PRESETS, fp_checkpoint, mean_std, parse_sets, write_results
from tabulate import tabulate

import fxquant
from fxquant import evaluate, fit
from fxquant.data import fashion_mnist

# Named groups of rows (a comma-separated list of recipes works too).
GROUPS = {
    "lsq": "lsq_w4a4,lsq_w3a3,lsq_w2a2",
    "features": "lsq_w4a4,cr_w4a4,fpq_w4a4,mec_w4a4,lsq_w2a2,cr_w2a2,fpq_w2a2,mec_w2a2,fpq_cr_w2a2",
    "features_short": "lsq_w2a2,cr_w2a2,fpq_w2a2,mec_w2a2,fpq_cr_w2a2,lsq_w4a4,fpq_w4a4",
    "sharpness": "lsq_w4a4,saq_w4a4,lsq_w2a2,saq_w2a2,lsq_w3a3,mixed_hessian",
}
DEFAULT_RECIPES = "lsq"


def run_recipe(recipe: str, fp_model, train_data, test_data, epochs: int, seed: int, overrides=None) -> dict:
    torch.manual_seed(seed)
    qmodel = fxquant.prepare_qat(fp_model, recipe, torch.randn(1, 1, 28, 28), **(overrides or {}))
    config = qmodel.recipe.train.override(epochs=epochs)
    start = time.perf_counter()
    history = fit(qmodel, train_data, None, config, description=f"{recipe} seed {seed}", seed=seed)
    seconds = time.perf_counter() - start
    result = evaluate(qmodel, torch.utils.data.DataLoader(test_data, batch_size=512))
    return {
        "recipe": recipe,
        "seed": seed,
        "wbits": qmodel.recipe.quant.weight.bits,
        "abits": qmodel.recipe.quant.activation.bits,
        "top1": result["top1"],
        "seconds": seconds,
        "images_per_second": statistics.mean(h.images_per_second for h in history),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the ≤ 15 min preset (default: full)")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"recipes, or a group: {', '.join(GROUPS)}")
    parser.add_argument("--tag", default="", help="suffix of the result files (to keep several tables)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--model", default="resnet20", choices=sorted(fxquant.models.MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qat-epochs", type=int, help="override the preset's QAT epochs")
    parser.add_argument(
        "--fp-seed", type=int, help="one FP checkpoint (this seed's) for every QAT seed; default: one per seed"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe value for every row, e.g. quant.activation.init=mse (repeatable; TOML values, else strings)",
    )
    parser.add_argument(
        "--merge", help="a results JSON of the same settings whose runs of other seeds join the table (mean ± std)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else "full"
    settings = dict(PRESETS[preset])
    if args.qat_epochs:
        settings["qat_epochs"] = args.qat_epochs
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = parse_sets(args.set)
    recipes = GROUPS.get(args.recipes, args.recipes).split(",")
    for recipe in recipes:  # fail on a typo before an hour of training
        fxquant.load_recipe(recipe, overrides or None)

    train_data = fashion_mnist("train", augment="standard", limit=settings["train_images"])
    test_data = fashion_mnist("test")
    test_loader = torch.utils.data.DataLoader(test_data, batch_size=512)
    runs, fp_runs = [], []
    if args.merge:  # earlier runs of other seeds, same settings: checked, not assumed
        earlier = json.loads(Path(args.merge).read_text())
        if earlier["settings"] != settings:
            raise SystemExit(f"--merge {args.merge}: its settings {earlier['settings']} differ from {settings}")
        kept = {r["seed"] for r in earlier["runs"] if r["recipe"] in recipes and r["seed"] not in seeds}
        runs += [r for r in earlier["runs"] if r["recipe"] in recipes and r["seed"] in kept]
        fp_runs += [r for r in earlier["fp"] if r["seed"] in kept]
    for seed in seeds:
        fp_model, fp_seconds = fp_checkpoint(
            args.model, preset, seed if args.fp_seed is None else args.fp_seed, train_data
        )
        fp_runs.append({"seed": seed, "top1": evaluate(fp_model, test_loader)["top1"], "seconds": fp_seconds})
        for recipe in recipes:
            run = run_recipe(recipe, fp_model, train_data, test_data, settings["qat_epochs"], seed, overrides)
            runs.append(run)
            print(f"{recipe} seed {seed}: top-1 {run['top1']:.2f}% (FP {fp_runs[-1]['top1']:.2f}%)", flush=True)

    fp_top1 = [r["top1"] for r in fp_runs]
    fp_of = {fp["seed"]: fp["top1"] for fp in fp_runs}
    speed = {(r["recipe"], r["seed"]): r["images_per_second"] for r in runs}
    rows = [["FP32", "32/32", mean_std(fp_top1), "—", "—"]]
    for recipe in recipes:
        mine = [r for r in runs if r["recipe"] == recipe]
        deltas = [r["top1"] - fp_of[r["seed"]] for r in mine]
        # cost relative to plain LSQ at the same widths (lsq_w2a2 for cr_w2a2), when it ran too
        base = "lsq_" + recipe.rsplit("_", 1)[-1]
        cost = [speed[(base, r["seed"])] / r["images_per_second"] for r in mine if (base, r["seed"]) in speed]
        rows.append(
            [
                recipe,
                f"{mine[0]['wbits']}/{mine[0]['abits']}",
                mean_std([r["top1"] for r in mine]),
                mean_std(deltas),
                f"{statistics.mean(cost):.2f}" if cost else "—",
            ]
        )
    table = tabulate(
        rows,
        headers=["recipe", "W/A bits", "top-1 %", "Δ vs FP (pt)", "time per image × LSQ same bits"],
        tablefmt="github",
    )
    text = (
        f"# Accuracy: Fashion-MNIST {args.model}, preset {preset}\n\n"
        f"{torch.get_num_threads()} threads. "
        f"{settings['train_images']} training images (standard augmentation), FP {settings['fp_epochs']} epochs "
        f"(SGD lr 0.1, cosine), every QAT row {settings['qat_epochs']} epochs from that FP checkpoint with its "
        f"recipe's [train] table; test set 10,000 images; seeds {sorted(fp_of)} (mean ± std when several)"
        + (f", every seed from the FP checkpoint of seed {args.fp_seed}" if args.fp_seed is not None else "")
        + (f"; runs of seeds not run here merged from {args.merge}" if args.merge else "")
        + ".\n\n"
        f"{table}\n"
    )
    stem = f"accuracy_{args.model}_{preset}" + (f"_{args.tag}" if args.tag else "")
    write_results(stem, text, {"settings": settings, "overrides": overrides, "fp": fp_runs, "runs": runs})


if __name__ == "__main__":
    main()
