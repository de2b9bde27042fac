"""Compiled on CPU: the quantizers' backward as fxquant's opaque op (the C kernel), or as inductor's own code.

fxquant compiles a quantizer's forward as traced tensor ops and runs its backward as ``fxquant::fake_quantize_backward``
(the C kernel's single pass); with ``FXQUANT_COMPILED_QUANTIZER=traced`` inductor generates the backward itself, and
with ``=op`` the forward stays the opaque op too (see ``fxquant/quant/kernel.py``). This runs compiled FP and the
three compiled W4A4 modes, interleaved in one process, on the models of ``overhead.py``; the table gives median steps
and ratios to compiled FP. Run it alone on the machine.

    python benchmarks/compiled_backward.py [--models resnet18,mobilenet_v2,resnet20,mlp,vit_tiny] [--steps 12]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results
from train_steps import MODELS, TimedStep, fp_and_w4a4, use_a_fresh_compile_cache

VARIANTS = (
    ("FP32 compiled", False, {}),
    ("W4A4 compiled, C-kernel backward", True, {"FXQUANT_COMPILED_QUANTIZER": "traced_forward"}),
    ("W4A4 compiled, inductor backward", True, {"FXQUANT_COMPILED_QUANTIZER": "traced"}),
    ("W4A4 compiled, opaque forward and backward", True, {"FXQUANT_COMPILED_QUANTIZER": "op"}),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_a_fresh_compile_cache()
    rows = []
    for name in args.models.split(","):
        model, qmodel, x, y = fp_and_w4a4(name)
        steppers = {}
        for label, quantized, environment in VARIANTS:
            source = copy.deepcopy(qmodel if quantized else model)
            # the environment is set during each step, so also while the first step traces and compiles
            steppers[label] = TimedStep(torch.compile(source), x, y, environment)
        for stepper in steppers.values():  # compile, then warm up
            for _ in range(4):
                stepper()
        times: dict[str, list[float]] = {label: [] for label in steppers}
        for _ in range(args.steps):
            for label, stepper in steppers.items():
                times[label].append(stepper())
        reference = statistics.median(times["FP32 compiled"])
        for label, values in times.items():
            median = statistics.median(values)
            rows.append([name, label, f"{median * 1e3:.1f}", f"{median / reference:.2f}"])
        print(tabulate(rows[-len(VARIANTS) :], tablefmt="plain"), flush=True)
    table = tabulate(rows, headers=["model", "variant", "median step ms", "× compiled FP"], tablefmt="github")
    text = (
        "# Compiled W4A4 on CPU: the C kernel's backward against inductor's\n\n"
        f"{args.threads} threads, "
        f"{args.steps} interleaved steps per variant after compilation and 3 warm-up steps, run alone on the "
        f"machine.\n\n{table}\n"
    )
    write_results("compiled_backward", text, {"rows": rows})


if __name__ == "__main__":
    main()
