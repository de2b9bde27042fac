"""Zero-shot QAT (LRQ) and its ablations vs real-data QAT with the same budget, from the FP resnet20.

Variants: LRQ (long-range generator + AMA + BN statistics + DKD), without the long-range blocks, without AMA,
with plain KD instead of DKD; "no training" (quantizers initialised on generated images, nothing learned);
"real data" (LSQ QAT on real Fashion-MNIST images, as many student steps of the same batch size).

    python benchmarks/zeroshot.py [--bits w4a4,w3a3] [--iterations 250] [--warmup 50] [--batch 32]

Writes benchmarks/results/zeroshot.md and .json.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, quick_setup, write_results

ABLATIONS = {
    "LRQ": {},
    "no long-range blocks": {"long_range": False},
    "no AMA": {"ama": False},
    "KD instead of DKD": {"distill": "kd"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="w4a4,w3a3")
    parser.add_argument("--ablate-bits", default="w4a4", help="widths at which every ablation runs")
    parser.add_argument("--iterations", type=int, default=250)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32, help="generator width")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, fp, test, fp_top1 = quick_setup()
    common = {
        "iterations": args.iterations,
        "warmup_iterations": args.warmup,
        "batch_size": args.batch,
        "generator_channels": args.channels,
    }
    student_steps = args.iterations - args.warmup
    rows = []
    for bits in args.bits.split(","):
        recipe = f"lrq_{bits}"
        variants = ABLATIONS if bits in args.ablate_bits.split(",") else {"LRQ": {}}
        for name, change in variants.items():
            qmodel = fxquant.prepare_qat(fp, recipe)
            result = fxquant.zeroshot.train(qmodel, {**common, **change})
            rows.append(
                {"bits": bits, "method": name, "top1": evaluate(qmodel, test)["top1"], "seconds": result.seconds}
            )
            if name == "LRQ":
                fxquant.zeroshot.save_grid(result.generator, RESULTS / f"zeroshot_samples_{bits}.png")
                warm = result.generator
            print(json.dumps(rows[-1]), flush=True)
        # no training: quantizers initialised on generated images
        qmodel = fxquant.prepare_qat(fp, recipe)
        with torch.no_grad():
            images = warm(*warm.sample(args.batch))
        fxquant.calibrate(qmodel, images)
        rows.append({"bits": bits, "method": "no training", "top1": evaluate(qmodel, test)["top1"], "seconds": 0.0})
        # real data, same number of student steps and batch size
        qmodel = fxquant.prepare_qat(fp, f"lsq_{bits}")
        subset = torch.utils.data.Subset(train, range(student_steps * args.batch))
        start = time.perf_counter()
        fit(qmodel, subset, None, qmodel.recipe.train.override(epochs=1, batch_size=args.batch), description="real")
        rows.append(
            {"bits": bits, "method": "real-data QAT", "top1": evaluate(qmodel, test)["top1"],
             "seconds": time.perf_counter() - start}
        )  # fmt: skip
        print(json.dumps(rows[-2:]), flush=True)

    table = tabulate(
        [
            [r["bits"].upper(), r["method"], f"{r['top1']:.2f}", f"{r['top1'] - fp_top1:+.2f}", f"{r['seconds']:.0f} s"]
            for r in rows
        ],
        headers=["bits", "method", "top-1 %", "Δ vs FP", "time"],
        tablefmt="github",
    )
    text = (
        "# Zero-shot quantization (LRQ) vs ablations vs real-data QAT · Fashion-MNIST resnet20\n\n"
        f"{torch.get_num_threads()} threads. FP resnet20 "
        f"(benchmarks/accuracy.py quick checkpoint, top-1 {fp_top1:.2f}%). {args.iterations} iterations of batch "
        f"{args.batch} ({args.warmup} generator-only), generator width {args.channels}; real-data QAT: "
        f"{student_steps} LSQ steps of {args.batch} real images. Samples: `zeroshot_samples_<bits>.png`.\n\n"
        f"{table}\n"
    )
    write_results("zeroshot", text, {"fp_top1": fp_top1, "rows": rows})


if __name__ == "__main__":
    main()
