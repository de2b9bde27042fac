"""Train-step overhead: FP vs fxquant (LSQ W8A8, W4A4) vs torch.ao prepare_qat_fx, interleaved in one process.

A step is forward + cross-entropy + backward + SGD step. Every variant of a model gets the same batch; after
warm-up the variants take turns, one step each, so that machine noise hits all of them alike; the median of
``--steps`` steps is reported, and the ratio to FP is what to compare across machines.

Memory is the activation memory saved for backward (unique storages recorded by autograd's saved-tensor
hooks during one forward): deterministic, unlike process RSS, and it is what quantizer nodes add.

    python benchmarks/overhead.py [--steps 20] [--models resnet18,mobilenet_v2,resnet20]

Writes benchmarks/results/overhead.md and overhead.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torchvision
from baselines import ao_prepare_qat_fx, ao_start_learning
from common import write_results
from tabulate import tabulate
from torch import nn

import fxquant

WARMUP_STEPS = 5
GOAL_RATIO = 1.3

# model name -> (builder, input shape of one batch, what data)
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (32, 3, 64, 64), "random"),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10), (32, 3, 64, 64), "random"),
    "resnet20": (lambda: fxquant.models.resnet20(), (128, 1, 28, 28), "fashion-mnist"),
    "mobilenet_v2_small": (lambda: fxquant.models.mobilenet_v2_small(), (128, 1, 28, 28), "fashion-mnist"),
}
VARIANTS = ("FP32", "fxquant W8A8", "fxquant W4A4", "torch.ao x86 (8-bit)", "torch.ao learnable W4A4")


def _batch(shape: tuple[int, ...], source: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    if source == "fashion-mnist":
        try:
            data = fxquant.data.fashion_mnist("train", limit=shape[0])
            x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=shape[0])))
            return x, y, "Fashion-MNIST batch"
        except fxquant.data.DataNotFoundError:
            pass
    torch.manual_seed(0)
    return torch.randn(shape), torch.randint(0, 10, (shape[0],)), "random batch"


def _build_variants(model: nn.Module, x: torch.Tensor) -> dict[str, nn.Module]:
    example = (x[:1],)
    return {
        "FP32": model,
        "fxquant W8A8": fxquant.prepare_qat(model, "lsq_w8a8", example[0]),
        "fxquant W4A4": fxquant.prepare_qat(model, "lsq_w4a4", example[0]),
        "torch.ao x86 (8-bit)": ao_prepare_qat_fx(model, example, "x86"),
        "torch.ao learnable W4A4": ao_prepare_qat_fx(model, example, "learnable4"),
    }


class _Stepper:
    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = model.train(), x, y
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def __call__(self) -> float:
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}
    params = {p.data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(storages.values())


def bench_model(name: str, steps: int) -> list[dict]:
    builder, shape, source = MODELS[name]
    torch.manual_seed(0)
    x, y, data_note = _batch(shape, source)
    variants = _build_variants(builder(), x)
    steppers = {label: _Stepper(m, x, y) for label, m in variants.items()}
    for label, stepper in steppers.items():
        stepper()  # first batch: fxquant initialises steps, torch.ao observes
        if label == "torch.ao learnable W4A4":
            ao_start_learning(stepper.model)
        for _ in range(WARMUP_STEPS - 1):
            stepper()
    times: dict[str, list[float]] = {label: [] for label in steppers}
    order = list(steppers)
    for i in range(steps):
        rotated = order[i % len(order) :] + order[: i % len(order)]  # no variant always runs first
        for label in rotated:
            times[label].append(steppers[label]())
    fp_ms = statistics.median(times["FP32"]) * 1e3
    fp_mem = _saved_activation_bytes(variants["FP32"], x)
    rows = []
    for label in steppers:
        ms = statistics.median(times[label]) * 1e3
        mem = _saved_activation_bytes(variants[label], x)
        rows.append(
            {
                "model": name,
                "batch": "×".join(map(str, shape)),
                "data": data_note,
                "variant": label,
                "median_ms": ms,
                "ratio_to_fp": ms / fp_ms,
                "saved_mb": mem / 2**20,
                "memory_ratio_to_fp": mem / fp_mem,
            }
        )
        print(f"{name:18s} {label:26s} {ms:8.1f} ms  ×{ms / fp_ms:.2f}  saved {mem / 2**20:7.1f} MB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant (after warm-up)")
    parser.add_argument("--models", default="resnet18,mobilenet_v2,resnet20", help=f"comma-separated: {list(MODELS)}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for name in args.models.split(",") for row in bench_model(name, args.steps)]

    verdicts = []
    for name in dict.fromkeys(r["model"] for r in rows):
        by = {r["variant"]: r for r in rows if r["model"] == name}
        ours = by["fxquant W4A4"]["ratio_to_fp"]
        theirs = by["torch.ao learnable W4A4"]["ratio_to_fp"]
        met = "met" if ours <= GOAL_RATIO else "NOT met"
        verdicts.append(
            f"- {name}: fxquant W4A4 ×{ours:.2f} of FP (goal ≤ {GOAL_RATIO}: {met}); "
            f"torch.ao learnable W4A4 ×{theirs:.2f}, x86 8-bit ×{by['torch.ao x86 (8-bit)']['ratio_to_fp']:.2f} "
            f"(fxquant {'below' if ours < theirs else 'NOT below'} torch.ao's learnable W4A4)"
        )
    table = tabulate(
        [
            [
                r["model"],
                r["batch"],
                r["variant"],
                f"{r['median_ms']:.1f}",
                f"{r['ratio_to_fp']:.2f}",
                f"{r['saved_mb']:.1f}",
                f"{r['memory_ratio_to_fp']:.2f}",
            ]
            for r in rows
        ],
        headers=["model", "batch", "variant", "median step ms", "× FP", "saved activations MB", "× FP"],
        tablefmt="github",
    )
    command = "python benchmarks/overhead.py " + " ".join(sys.argv[1:])
    text = (
        "# Train-step overhead: FP vs fxquant vs torch.ao prepare_qat_fx\n\n"
        f"Command: `{command.strip()}`; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.steps} interleaved steps per variant after {WARMUP_STEPS} warm-up steps; median step time "
        "(forward + backward + SGD). fxquant: lsq_w8a8 / lsq_w4a4 recipes (LSQ per-channel weights, LSQ+ "
        "activations, first/last layer at 8 bits for W4A4). torch.ao learnable W4A4: `_LearnableFakeQuantize`, "
        "per-channel weights, per-tensor activations, learning enabled after the first batch.\n\n"
        + "\n".join(verdicts)
        + f"\n\n{table}\n"
    )
    write_results("overhead", text, {"rows": rows})


if __name__ == "__main__":
    main()
