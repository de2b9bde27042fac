"""ACS vs a random subset vs the full data, clean and with symmetric label noise, on Fashion-MNIST.

Every run starts from the same FP checkpoint (benchmarks/accuracy.py's, trained on clean data) and trains the
same number of epochs over its own data (the same number of steps per sample); wall time includes ACS's
scoring passes. With noise, the QAT data has that fraction of labels flipped; the report counts how many noisy
samples each subset holds.

    python benchmarks/coreset.py --quick [--bits w4a4,w2a2] [--fractions 0.1,0.3] [--noise 0,0.2]

Writes benchmarks/results/coreset_<preset>[_<tag>].md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxquant
from fxquant import evaluate, fit
from fxquant.data import fashion_mnist
from fxquant.train.coreset import NoisyLabels, random_subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESETS, fp_checkpoint, parse_sets, write_results

EPOCHS = {"quick": 3, "full": 6}


def run(fp_model, bits, method, fraction, train_data, test_loader, epochs, seed, schedule="paper", sets=None):
    torch.manual_seed(seed)
    overrides = dict(sets or {})
    data = train_data
    if method == "acs":
        overrides["data"] = {"coreset": {"fraction": fraction, "refresh_every": 1, "schedule": schedule}}
    elif method == "random":
        chosen = random_subset(train_data.labels, fraction, seed)
        data = torch.utils.data.Subset(train_data, chosen.tolist())
    qmodel = fxquant.prepare_qat(fp_model, f"lsq_{bits}", **overrides)
    start = time.perf_counter()
    history = fit(qmodel, data, None, qmodel.recipe.train.override(epochs=epochs), description=f"{bits} {method}")
    seconds = time.perf_counter() - start
    noisy = train_data.noisy
    if method == "acs":
        picks = [h.coreset for h in history if h.coreset is not None]
        noisy_share = sum(r.noisy_selected for r in picks) / max(sum(r.selected for r in picks), 1)
    elif method == "random":
        noisy_share = float(noisy[chosen].float().mean())
    else:
        noisy_share = float(noisy.float().mean())
    return {
        "bits": bits,
        "method": method,
        "fraction": fraction,
        "top1": evaluate(qmodel, test_loader)["top1"],
        "seconds": seconds,
        "scoring_seconds": sum(h.scoring_seconds for h in history),
        "samples_trained": sum(h.train_samples for h in history),
        "noisy_share": noisy_share,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bits", default="w4a4,w2a2")
    parser.add_argument("--fractions", default="0.1,0.3")
    parser.add_argument("--noise", default="0,0.2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schedule", default="paper", help="ACS's EVS/DS weighting: paper, code_cosine, linear")
    parser.add_argument("--tag", default="", help="suffix of the result files (to keep several tables)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe value for every run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = parse_sets(args.set)
    preset = "quick" if args.quick else "full"
    settings = PRESETS[preset]
    clean = fashion_mnist("train", augment="standard", limit=settings["train_images"])
    fp_model, _ = fp_checkpoint("resnet20", preset, args.seed, clean)
    test_loader = torch.utils.data.DataLoader(fashion_mnist("test"), batch_size=512)
    fp_top1 = evaluate(fp_model, test_loader)["top1"]
    rows = []
    for noise in (float(v) for v in args.noise.split(",")):
        train_data = NoisyLabels(clean, noise, seed=args.seed)
        for bits in args.bits.split(","):
            plan = [("full", 1.0)] + [(m, float(f)) for f in args.fractions.split(",") for m in ("acs", "random")]
            for method, fraction in plan:
                epochs = EPOCHS[preset]
                row = run(
                    fp_model, bits, method, fraction, train_data, test_loader, epochs, args.seed, args.schedule, sets
                )
                row["noise"] = noise
                rows.append(row)
                print(json.dumps(row), flush=True)

    table_rows = []
    for r in rows:
        full = next(x for x in rows if x["bits"] == r["bits"] and x["noise"] == r["noise"] and x["method"] == "full")
        table_rows.append(
            [
                f"{100 * r['noise']:.0f}%",
                r["bits"].upper(),
                r["method"],
                f"{100 * r['fraction']:.0f}%",
                f"{r['top1']:.2f}",
                f"{r['top1'] - full['top1']:+.2f}",
                f"{r['seconds']:.0f} s",
                f"{r['scoring_seconds']:.0f} s",
                f"{r['seconds'] / full['seconds']:.2f}",
                f"{100 * r['noisy_share']:.1f}%",
            ]
        )
    table = tabulate(
        table_rows,
        headers=["label noise", "bits", "data", "fraction", "top-1 %", "Δ vs full", "wall time", "of it scoring",
                 "time × full", "noisy labels in the data trained on"],
        tablefmt="github",
    )  # fmt: skip
    text = (
        f"# ACS vs random vs full data · Fashion-MNIST resnet20 · preset {preset}\n\n"
        f"{torch.get_num_threads()} threads. FP checkpoint "
        f"(clean labels, top-1 {fp_top1:.2f}%) from benchmarks/accuracy.py's {preset} preset; "
        f"{settings['train_images']} training images; every QAT run {EPOCHS[preset]} epochs over its own data; "
        f"ACS re-selects every epoch ({args.schedule} schedule of EVS and DS); random = a class-balanced random "
        "subset of the same size, fixed.\n\n"
        f"{table}\n"
    )
    stem = f"coreset_{preset}" + (f"_{args.tag}" if args.tag else "")
    write_results(stem, text, {"rows": rows})


if __name__ == "__main__":
    main()
