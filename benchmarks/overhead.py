"""Train-step overhead: FP vs fxquant (LSQ W8A8, W4A4), eager and compiled, vs torch.ao and the peers.

A step is forward + cross-entropy + backward + SGD step. Every variant of a model gets the same batch; after
warm-up (which includes compilation for the compiled variants) the variants take turns, one step each, so
that machine noise hits all of them alike; the median of ``--steps`` steps is reported. Eager variants are
compared with eager FP, compiled ones with compiled FP: the ratio is what to compare across machines.

Peers: torch.ao's FX QAT always (it ships with torch); Brevitas, NNCF and torchao's QAT when importable —
``make bench-peers`` installs them in a separate environment (``.venv-bench``) and runs this file there.

Memory is the activation memory saved for backward (unique storages recorded by autograd's saved-tensor
hooks during one eager forward): deterministic, unlike process RSS, and it is what quantizer nodes add.

    python benchmarks/overhead.py [--steps 20] [--models resnet18,mobilenet_v2,resnet20,mlp,vit_tiny]
                                  [--no-compile] [--profile resnet20] [--fit]

Writes benchmarks/results/overhead.md and overhead.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import peers
import torch
from baselines import ao_prepare_qat_fx, ao_start_learning
from common import write_results
from tabulate import tabulate
from torch import nn
from train_steps import (
    MEMORY_GOAL,
    MODELS,
    Bench,
    TimedStep,
    batch_of,
    environment,
    fp_and_w4a4,
    use_a_fresh_compile_cache,
)

import fxquant

WARMUP_STEPS = 5


# lsq_w4a4 with the network input's 8-bit range observed instead of learned: no gradient is needed at the first
# layer's input, so autograd skips that convolution's input-gradient pass (what torch.ao's x86 QAT does too)
OBSERVED_INPUT = {"extends": "lsq_w4a4", "quant": {"first_layer": {"activation_scheme": "observer"}}}


@dataclass
class Variant:
    label: str
    model: nn.Module
    compiled: bool = False
    after_first_step: Callable[[nn.Module], object] | None = None
    environment: dict[str, str] = field(default_factory=dict)  # set around each of its steps


def _variants(bench: Bench, x: torch.Tensor, compile_too: bool, with_peers: bool) -> tuple[list[Variant], list[str]]:
    """Every variant of one model (each its own copy of the same float weights) and the peers left out, why."""
    torch.manual_seed(0)
    model = bench.build()
    example = x[:1]
    w8 = fxquant.prepare_qat(model, "lsq_w8a8", example)
    w4 = fxquant.prepare_qat(model, "lsq_w4a4", example)
    w4_observed = fxquant.prepare_qat(model, OBSERVED_INPUT, example)
    for qmodel in (w8, w4, w4_observed):
        fxquant.calibrate(qmodel, x)
    variants = [
        Variant("FP32", model),
        Variant("fxquant W8A8", w8),
        Variant("fxquant W4A4", w4),
        Variant("fxquant W4A4, input observed", w4_observed),
        Variant("torch.ao x86 (8-bit)", ao_prepare_qat_fx(model, (example,), "x86")),
        Variant(
            "torch.ao learnable W4A4",
            ao_prepare_qat_fx(model, (example,), "learnable4"),
            after_first_step=ao_start_learning,
        ),
    ]
    missing = []
    if with_peers:
        for label, prepare in peers.PEERS.items():
            if label.startswith("torchao") and not bench.has_linear_layers:
                missing.append(f"{label}: rewrites nn.Linear only (no convolutions)")
                continue
            try:
                variants.append(Variant(label, prepare(model, x)))
            except peers.Unavailable as why:
                missing.append(f"{label}: {why}")
    if compile_too:
        fp_copy = bench.build()
        fp_copy.load_state_dict(model.state_dict())
        w4_copy = fxquant.prepare_qat(fp_copy, "lsq_w4a4", example)
        fxquant.calibrate(w4_copy, x)
        variants += [
            Variant("FP32 compiled", torch.compile(fp_copy), True),
            Variant("fxquant W4A4 compiled", torch.compile(w4_copy), True),
        ]
    return variants, missing


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


def bench_model(name: str, steps: int, compile_too: bool, with_peers: bool) -> tuple[list[dict], list[str]]:
    bench = MODELS[name]
    x, y, data_note = batch_of(bench.shape, bench.data)
    variants, missing = _variants(bench, x, compile_too, with_peers)
    steppers = {v.label: TimedStep(v.model, x, y, v.environment) for v in variants}
    warmup_seconds = {}
    for v in variants:
        start = time.perf_counter()
        steppers[v.label]()  # first step: compilation for the compiled variants, torch.ao's observers
        warmup_seconds[v.label] = time.perf_counter() - start
        if v.after_first_step is not None:
            v.after_first_step(v.model)
        for _ in range(WARMUP_STEPS - 1):
            steppers[v.label]()
    times: dict[str, list[float]] = {label: [] for label in steppers}
    order = list(steppers)
    for i in range(steps):
        rotated = order[i % len(order) :] + order[: i % len(order)]  # no variant always runs first
        for label in rotated:
            times[label].append(steppers[label]())
    medians = {label: statistics.median(t) * 1e3 for label, t in times.items()}
    fp_mem = _saved_activation_bytes(variants[0].model, x)
    rows = []
    for v in variants:
        reference = "FP32 compiled" if v.compiled else "FP32"
        with environment(v.environment):
            mem = None if v.compiled else _saved_activation_bytes(v.model, x)
        rows.append(
            {
                "model": name,
                "batch": "×".join(map(str, bench.shape)),
                "data": data_note,
                "variant": v.label,
                "compiled": v.compiled,
                "median_ms": medians[v.label],
                "ratio_to_fp": medians[v.label] / medians[reference],
                "reference": reference,
                "first_step_s": warmup_seconds[v.label],
                "saved_mb": None if mem is None else mem / 2**20,
                "memory_ratio_to_fp": None if mem is None else mem / fp_mem,
            }
        )
        print(
            f"{name:14s} {v.label:26s} {medians[v.label]:8.1f} ms  ×{rows[-1]['ratio_to_fp']:.2f} of {reference}"
            f"  first step {warmup_seconds[v.label]:6.1f} s",
            flush=True,
        )
    return rows, missing


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def verdicts(rows: list[dict]) -> list[str]:
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        by = {r["variant"]: r for r in rows if r["model"] == name}
        goal = MODELS[name].goal
        ours = by["fxquant W4A4"]["ratio_to_fp"]
        parts = [f"eager W4A4 ×{ours:.2f} of FP (goal ≤ {goal}: {_met(ours <= goal)})"]
        if "fxquant W4A4, input observed" in by:
            observed = by["fxquant W4A4, input observed"]["ratio_to_fp"]
            parts.append(f"with the input observed ×{observed:.2f} ({_met(observed <= goal)})")
        if "fxquant W4A4 compiled" in by:
            compiled = by["fxquant W4A4 compiled"]["ratio_to_fp"]
            parts.append(
                f"compiled W4A4 ×{compiled:.2f} of compiled FP ({_met(compiled <= goal)}; "
                f"compiled FP is ×{by['FP32 compiled']['median_ms'] / by['FP32']['median_ms']:.2f} of eager FP)"
            )
        memory = by["fxquant W4A4"].get("memory_ratio_to_fp")
        if memory is not None:
            parts.append(f"saved activations ×{memory:.2f} of FP (goal ≤ {MEMORY_GOAL}: {_met(memory <= MEMORY_GOAL)})")
        others = {label: r["ratio_to_fp"] for label, r in by.items() if not label.startswith(("fxquant", "FP32"))}
        beaten = [label for label, ratio in others.items() if ratio <= ours]
        peers_text = ", ".join(f"{label} ×{ratio:.2f}" for label, ratio in others.items())
        verdict = "below every peer" if not beaten else f"NOT below {', '.join(beaten)}"
        lines.append(f"- **{name}**: " + "; ".join(parts) + f". Peers: {peers_text} — fxquant W4A4 {verdict}.")
    return lines


def profile_table(name: str, steps: int = 3) -> str:
    """torch.profiler's per-op self-CPU table of the eager W4A4 step next to the FP step's, top ops."""
    model, qmodel, x, y = fp_and_w4a4(name)
    tables = []
    for label, m in (("FP32", model), ("fxquant W4A4", qmodel)):
        stepper = TimedStep(m, x, y, {})
        for _ in range(2):
            stepper()
        with torch.profiler.profile() as prof:
            for _ in range(steps):
                stepper()
        averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in averages) / steps / 1e3
        rows = [
            [e.key[:48], f"{e.self_cpu_time_total / steps / 1e3:.1f}", e.count // steps]
            for e in averages[:14]
            if e.self_cpu_time_total > 0
        ]
        tables.append(
            f"{label} step on {name}, self CPU per step (total {total:.0f} ms):\n\n"
            + tabulate(rows, headers=["op", "ms / step", "calls / step"], tablefmt="github")
        )
    return "\n\n".join(tables)


def fit_throughput(images: int = 5120) -> list[dict]:
    """Images/s of fxquant.fit's second epoch on resnet20 (Fashion-MNIST, standard augmentation, batch 128;
    data loading included), FP and W4A4, eager and compiled."""
    data = fxquant.data.fashion_mnist("train", augment="standard", limit=images)
    example = torch.randn(1, 1, 28, 28)
    rows = []
    for label, quantized, compiled in (
        ("FP32", False, False),
        ("fxquant W4A4", True, False),
        ("FP32 compiled", False, True),
        ("fxquant W4A4 compiled", True, True),
    ):
        torch.manual_seed(0)
        model = fxquant.models.resnet20()
        if quantized:
            model = fxquant.prepare_qat(model, "lsq_w4a4", example)
        history = fxquant.fit(model, data, None, {"epochs": 2, "batch_size": 128}, progress=False, compile=compiled)
        rows.append({"variant": label, "images_per_second": history[-1].images_per_second})
        print(f"fit resnet20 {label:24s} {history[-1].images_per_second:7.0f} img/s (epoch 2)", flush=True)
    fp = {False: rows[0]["images_per_second"], True: rows[2]["images_per_second"]}
    for row in rows:
        row["ratio_to_fp"] = fp["compiled" in row["variant"]] / row["images_per_second"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant (after warm-up)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {list(MODELS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled variants")
    parser.add_argument("--no-peers", action="store_true", help="leave out Brevitas, NNCF and torchao")
    parser.add_argument("--profile", default="resnet20", help="model whose per-op table is printed ('' for none)")
    parser.add_argument("--fit", action="store_true", help="also measure fit's images/s on resnet20")
    parser.add_argument("--name", default="overhead", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_a_fresh_compile_cache()
    rows, missing = [], []
    for name in args.models.split(","):
        model_rows, model_missing = bench_model(name, args.steps, not args.no_compile, not args.no_peers)
        rows += model_rows
        missing += [f"{name}: {why}" for why in model_missing]
    fit_rows = fit_throughput() if args.fit else []
    profile = profile_table(args.profile) if args.profile else ""

    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    table = tabulate(
        [
            [
                r["model"],
                r["batch"],
                r["variant"],
                fmt(r["median_ms"], ".1f"),
                fmt(r["ratio_to_fp"], ".2f"),
                fmt(r["first_step_s"], ".1f"),
                fmt(r["saved_mb"], ".1f"),
                fmt(r["memory_ratio_to_fp"], ".2f"),
            ]
            for r in rows
        ],
        headers=["model", "batch", "variant", "median step ms", "× FP", "first step s", "saved act. MB", "× FP"],
        tablefmt="github",
    )
    peer_versions = ", ".join(f"{name} {version}" for name, version in peers.versions().items())
    text = (
        "# Train-step overhead: FP vs fxquant (eager and compiled) vs torch.ao and the peers\n\n"
        "Peers: `make bench-peers`. "
        f"{torch.get_num_threads()} threads, {args.steps} interleaved steps per variant after {WARMUP_STEPS} warm-up "
        "steps; median step time (forward + backward + SGD). A compiled variant's × FP is against compiled FP; "
        "its first step includes compilation. fxquant: lsq_w8a8 / lsq_w4a4 (LSQ per-channel weights, LSQ+ "
        "activations, first/last layer at 8 bits for W4A4), calibrated before the first step. torch.ao learnable "
        "W4A4: `_LearnableFakeQuantize`, per-channel weights, per-tensor activations, learning after the first "
        f"batch. Peers installed: {peer_versions or 'none'}.\n\n"
        + "\n".join(verdicts(rows))
        + ("\n\nNot measured: " + "; ".join(missing) if missing else "")
        + f"\n\n{table}\n"
    )
    if fit_rows:
        text += "\n## fxquant.fit end to end (resnet20, Fashion-MNIST, batch 128, data loading included)\n\n"
        text += tabulate(
            [[r["variant"], f"{r['images_per_second']:.0f}", f"{r['ratio_to_fp']:.2f}"] for r in fit_rows],
            headers=["variant", "images/s (epoch 2)", "time × FP"],
            tablefmt="github",
        )
        text += "\n"
    if profile:
        text += f"\n## Where the eager step's time goes (torch.profiler)\n\n{profile}\n"
    print(text)
    write_results(args.name, text, {"rows": rows, "fit": fit_rows, "missing": missing})


if __name__ == "__main__":
    main()
