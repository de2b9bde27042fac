"""Does channels_last make the eager W4A4 step cheaper? FP and fxquant W4A4, each in NCHW and channels_last.

Issue 16 asked to consider channels_last for convolutions "where it wins". Each variant takes interleaved steps
in one process (batch 32, 64×64, SGD at lr 0, so every step sees the same weights); the table gives the median
step, its ratio to FP in NCHW (the format the user's model has) and to FP in the same layout (the quantization
overhead). fxquant's C kernel runs channels-last tensors where they lie. Run it alone on the machine.

    python benchmarks/channels_last.py [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate

import fxquant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        fp = getattr(torchvision.models, name)(weights=None, num_classes=10)
        x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
        qmodel = fxquant.prepare_qat(fp, "lsq_w4a4", x)
        fxquant.calibrate(qmodel, x)
        steps = {}
        for label, model in (("FP32", fp), ("fxquant W4A4", qmodel)):
            for layout in ("NCHW", "channels_last"):
                copy_ = copy.deepcopy(model).train()
                inputs = x
                if layout == "channels_last":
                    copy_ = copy_.to(memory_format=torch.channels_last)
                    inputs = x.contiguous(memory_format=torch.channels_last)
                steps[(label, layout)] = train_step(copy_, inputs, y)
        for step in steps.values():  # warm-up
            for _ in range(3):
                step()
        times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
        for _ in range(args.steps):
            for key, step in steps.items():
                start = time.perf_counter()
                step()
                times[key].append(time.perf_counter() - start)
        medians = {key: statistics.median(values) for key, values in times.items()}
        for (label, layout), median in medians.items():
            same_layout = median / medians[("FP32", layout)]
            ratio = median / medians[("FP32", "NCHW")]
            rows.append([name, label, layout, f"{median * 1e3:.1f}", f"{ratio:.2f}", f"{same_layout:.2f}"])
        print(rows[-4:], flush=True)
    table = tabulate(
        rows,
        headers=["model", "variant", "layout", "median step ms", "× FP NCHW", "× FP same layout"],
        tablefmt="github",
    )
    text = (
        "# channels_last: FP and fxquant W4A4 train steps in NCHW and channels_last\n\n"
        f"{args.threads} threads, batch 32×3×64×64, "
        f"{args.steps} interleaved steps per variant after 3 warm-up steps, run alone on the machine.\n\n{table}\n"
    )
    write_results("channels_last", text, {"rows": rows})


if __name__ == "__main__":
    main()
