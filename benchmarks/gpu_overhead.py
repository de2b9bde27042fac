"""GPU train-step overhead: FP against fxquant (W4A4, W8A8, llm_w4a8), torch.ao and torchao's QAT, in fp32 and bf16,
eager and compiled, with peak activation memory and compile time.

A step is forward (under autocast for bf16) + cross-entropy + backward + SGD with momentum (+ fxquant's step clamp,
as ``fxquant.TrainStep`` does). Every variant of a model steps on the same batch; after warm-up the variants take
turns (the order rotates each round), each step timed between two ``torch.cuda.synchronize()``, and the median of
``--rounds`` rounds is reported with its ratio to the FP step of the same precision and mode. Peak activation
memory is ``torch.cuda.max_memory_allocated()`` during one step over what was allocated before it (the resident
model, optimizer state); compile time is the first compiled step. fxquant is calibrated on the GPU before timing.

Peers: torch.ao FX QAT (its default 8-bit qconfig, and its learnable fake quant at 4 bits) where its FX tracing
takes the model, in fp32 (its fake-quant kernels have no bf16 path); torchao's QAT (``QATConfig``: "8da4w", int8
per-token activations and int4 weights in groups of 32, and a W4A4 config) on models whose work is Linear layers
(torchao's QAT rewrites nn.Linear only), when torchao imports.

    python benchmarks/gpu_overhead.py [--models resnet50,mobilenet_v2,vit_b_16,llama] [--rounds 10]
                                      [--compiled llama] [--budget 240]

``--budget`` (seconds) stops before starting a model that would not fit; what was left out is listed. Writes
benchmarks/results/gpu_overhead.md and .json (after every model, so a stopped run keeps what it measured).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peers
import torch
import torchvision
from baselines import ao_prepare_qat_fx, ao_start_learning
from common import write_results
from tabulate import tabulate
from torch import nn
from train_steps import environment

import fxquant

try:
    import transformers
except ImportError:  # the LLaMA-style model then reports itself missing
    transformers = None

WARMUP = 3
GOALS = {"bf16": 1.10, "fp32": 1.15, "llm_bf16": 1.05, "compiled": 1.05, "memory": 1.10}


def llama_style() -> nn.Module:
    """The LLaMA-style config of the speed issue: 8 layers, hidden 1024, 16 heads (built from a config)."""
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=1024,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


@dataclass(frozen=True)
class Bench:
    build: Callable[[], nn.Module]
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    recipes: tuple[str, ...]  # fxquant recipes measured in bf16 (the first also in fp32)
    linear_work: bool  # torchao's QAT applies (it rewrites nn.Linear only)
    tokens: bool = False  # a language model: logits (batch, tokens, vocab)


def _images(n: int, classes: int = 1000) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    return lambda: (torch.randn(n, 3, 224, 224), torch.randint(0, classes, (n,)))


MODELS = {
    "resnet50": Bench(lambda: torchvision.models.resnet50(weights=None), _images(128), ("lsq_w4a4", "lsq_w8a8"), False),
    "mobilenet_v2": Bench(
        lambda: torchvision.models.mobilenet_v2(weights=None), _images(128), ("lsq_w4a4", "lsq_w8a8"), False
    ),
    "vit_b_16": Bench(lambda: torchvision.models.vit_b_16(weights=None), _images(64), ("lsq_w4a4", "lsq_w8a8"), True),
    "llama": Bench(
        llama_style,
        lambda: (torch.randint(0, 32000, (8, 512)), torch.randint(0, 32000, (8, 512))),
        ("llm_w4a8",),
        True,
        tokens=True,
    ),
}


@dataclass
class Variant:
    label: str
    model: nn.Module
    precision: str  # fp32 or bf16
    compiled: bool = False
    family: str = "FP"  # FP, fxquant, torch.ao, torchao
    mode: str = "traced_forward"  # FXQUANT_COMPILED_QUANTIZER while a compiled variant traces
    after_first_step: Callable[[nn.Module], object] | None = None
    times: list[float] = field(default_factory=list)
    first_step: float = 0.0
    peak_gb: float | None = None


class Stepper:
    """One timed train step of a variant on the shared batch."""

    def __init__(self, variant: Variant, x: torch.Tensor, y: torch.Tensor, tokens: bool):
        self.v, self.x, self.y, self.tokens = variant, x, y, tokens
        self.model = torch.compile(variant.model) if variant.compiled else variant.model
        self.optimizer = torch.optim.SGD(variant.model.parameters(), lr=1e-4, momentum=0.9)
        self.quantized = isinstance(variant.model, fxquant.QATModel)

    def _loss(self) -> torch.Tensor:
        out = self.model(self.x)
        logits = out.logits if hasattr(out, "logits") else out
        if self.tokens:
            return nn.functional.cross_entropy(logits.flatten(0, 1).float(), self.y.flatten())
        return nn.functional.cross_entropy(logits.float(), self.y)

    def __call__(self) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.v.precision == "bf16"):
            loss = self._loss()
        loss.backward()
        self.optimizer.step()
        if self.quantized:
            fxquant.quant.clamp_steps(self.v.model)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def peak_gb(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self()
        return (torch.cuda.max_memory_allocated() - before) / 2**30


def _fxquant(model: nn.Module, recipe: str, x: torch.Tensor) -> nn.Module:
    qmodel = fxquant.prepare_qat(model, recipe, x[:1]).cuda()
    fxquant.calibrate(qmodel, x)
    return qmodel


def _torchao(model: nn.Module, weight_group: bool, activation_bits: int) -> nn.Module:
    qat = peers._import("torchao.quantization.qat")
    quantization = peers._import("torchao.quantization")
    qmodel = copy.deepcopy(model)
    dtype = torch.int8 if activation_bits == 8 else torch.int4
    weights = (
        qat.IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
        if weight_group
        else qat.IntxFakeQuantizeConfig(torch.int4, "per_channel", is_symmetric=True)
    )
    config = qat.QATConfig(
        activation_config=qat.IntxFakeQuantizeConfig(dtype, "per_token", is_symmetric=False),
        weight_config=weights,
        step="prepare",
    )
    quantization.quantize_(qmodel, config)
    return qmodel.train()


def variants_of(
    name: str, bench: Bench, x: torch.Tensor, compiled: bool, modes: tuple[str, ...]
) -> tuple[list[Variant], list[str]]:
    """Every variant of one model (copies of the same float weights) and the peers left out, with why."""
    torch.manual_seed(0)
    model = bench.build().cuda().train()
    missing: list[str] = []
    if compiled:
        found = [Variant("FP", copy.deepcopy(model), "bf16", True)]
        for mode in modes:
            qmodel = _fxquant(model, bench.recipes[0], x)
            found.append(Variant(f"fxquant {bench.recipes[0]} ({mode})", qmodel, "bf16", True, "fxquant", mode=mode))
        return found, missing
    found = [Variant("FP", copy.deepcopy(model), "fp32"), Variant("FP", copy.deepcopy(model), "bf16")]
    found.append(Variant(f"fxquant {bench.recipes[0]}", _fxquant(model, bench.recipes[0], x), "fp32", family="fxquant"))
    for recipe in bench.recipes:
        found.append(Variant(f"fxquant {recipe}", _fxquant(model, recipe, x), "bf16", family="fxquant"))
    if not bench.tokens:
        for preset, label in (("x86", "torch.ao FX 8-bit"), ("learnable4", "torch.ao learnable 4-bit")):
            try:
                ao = ao_prepare_qat_fx(model, (x[:1],), preset)
                after = ao_start_learning if preset == "learnable4" else None
                found.append(Variant(label, ao, "fp32", family="torch.ao", after_first_step=after))
            except Exception as error:  # torch.ao's FX tracing refuses the model
                missing.append(f"{name} {label}: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
    else:
        missing.append(f"{name} torch.ao: its FX tracing cannot take a Hugging Face model")
    if bench.linear_work:
        for label, group, bits in (("torchao QAT 8da4w", True, 8), ("torchao QAT W4A4", False, 4)):
            try:
                found.append(Variant(label, _torchao(model, group, bits), "bf16", family="torchao"))
            except Exception as error:
                missing.append(f"{name} {label}: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
    else:
        missing.append(f"{name} torchao QAT: rewrites nn.Linear only (this model's work is convolutions)")
    return found, missing


def bench_model(name: str, rounds: int, compiled: bool, modes: tuple[str, ...]) -> tuple[list[dict], list[str]]:
    bench = MODELS[name]
    if bench.tokens and transformers is None:
        return [], [f"{name}: transformers is not installed"]
    x, y = (t.cuda() for t in bench.batch())
    variants, missing = variants_of(name, bench, x, compiled, modes)
    steppers = {}
    for v in variants:
        settings = {"FXQUANT_COMPILED_QUANTIZER": v.mode}
        with environment(settings):
            stepper = Stepper(v, x, y, bench.tokens)
            try:
                start = time.perf_counter()
                stepper()  # compilation, initial observers, kernels' JIT
                v.first_step = time.perf_counter() - start
                if v.after_first_step is not None:
                    v.after_first_step(v.model)
                for _ in range(WARMUP - 1):
                    stepper()
                v.peak_gb = None if compiled else stepper.peak_gb()
            except Exception as error:
                first = (str(error).splitlines() or [""])[0][:120]
                missing.append(f"{name} {v.label} {v.precision}: {type(error).__name__}: {first}")
                continue
        steppers[v.label, v.precision] = (stepper, settings)
    order = list(steppers)
    for i in range(rounds):
        for key in order[i % len(order) :] + order[: i % len(order)]:  # no variant always runs first
            stepper, settings = steppers[key]
            with environment(settings):
                stepper.v.times.append(stepper())
    rows = []
    fp = {v.precision: v for v in variants if v.family == "FP"}
    for stepper, _ in steppers.values():
        v = stepper.v
        reference = fp.get(v.precision)
        median = statistics.median(v.times) * 1e3
        fp_median = statistics.median(reference.times) * 1e3 if reference is not None and reference.times else None
        rows.append(
            {
                "model": name,
                "batch": "×".join(map(str, x.shape)),
                "variant": v.label,
                "family": v.family,
                "precision": v.precision,
                "mode": "compiled" if v.compiled else "eager",
                "median_ms": median,
                "ratio_to_fp": median / fp_median if fp_median else None,
                "peak_gb": v.peak_gb,
                "memory_ratio_to_fp": (
                    v.peak_gb / reference.peak_gb if v.peak_gb and reference and reference.peak_gb else None
                ),
                "first_step_s": v.first_step,
            }
        )
        print(
            f"{name:12s} {v.label:34s} {v.precision:5s} {rows[-1]['mode']:8s} {median:8.1f} ms  "
            f"×{rows[-1]['ratio_to_fp'] or float('nan'):.2f}  first step {v.first_step:6.1f} s",
            flush=True,
        )
    del steppers, variants
    torch.cuda.empty_cache()
    return rows, missing


def _find(rows: list[dict], model: str, variant: str, precision: str, mode: str = "eager") -> dict | None:
    wanted = (model, variant, precision, mode)
    return next((r for r in rows if (r["model"], r["variant"], r["precision"], r["mode"]) == wanted), None)


def _verdict(value: float | None, goal: float) -> str:
    return "—" if value is None else f"×{value:.2f} ({'met' if value <= goal else 'NOT met'}, goal ≤ {goal})"


def verdicts(rows: list[dict]) -> list[str]:
    """Each goal of the GPU speed issue as met or not, with the figure."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        recipe = MODELS[model].recipes[0]
        ours = f"fxquant {recipe}"
        eager = [r for r in rows if r["model"] == model and r["mode"] == "eager"]
        parts = []
        for precision in ("bf16", "fp32"):
            found = _find(rows, model, ours, precision)
            goal = GOALS["llm_bf16"] if MODELS[model].tokens and precision == "bf16" else GOALS[precision]
            parts.append(f"{precision} {recipe} {_verdict(found and found['ratio_to_fp'], goal)}")
        memories = [r["memory_ratio_to_fp"] for r in eager if r["family"] == "fxquant" and r["memory_ratio_to_fp"]]
        if memories:
            parts.append(f"peak activation memory {_verdict(max(memories), GOALS['memory'])} (worst fxquant row)")
        for precision in ("fp32", "bf16"):
            found = _find(rows, model, ours, precision)
            others = [r for r in eager if r["family"] in ("torch.ao", "torchao") and r["precision"] == precision]
            if found and others:
                beaten = [r["variant"] for r in others if r["ratio_to_fp"] <= found["ratio_to_fp"]]
                listing = ", ".join(f"{r['variant']} ×{r['ratio_to_fp']:.2f}" for r in others)
                outcome = "below every peer" if not beaten else f"NOT below {', '.join(beaten)}"
                parts.append(f"{precision} peers {listing}: {outcome}")
        for r in rows:
            if r["model"] == model and r["mode"] == "compiled":
                measured = "" if r["family"] == "FP" else f" {_verdict(r['ratio_to_fp'], GOALS['compiled'])},"
                parts.append(f"compiled {r['variant']}{measured} compile {r['first_step_s']:.0f} s")
        lines.append(f"- **{model}**: " + "; ".join(parts) + ".")
    return lines


def table(rows: list[dict]) -> str:
    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    body = [
        [
            r["model"], r["batch"], r["variant"], r["precision"], r["mode"], fmt(r["median_ms"], ".1f"),
            fmt(r["ratio_to_fp"], ".2f"), fmt(r["peak_gb"], ".2f"), fmt(r["memory_ratio_to_fp"], ".2f"),
            fmt(r["first_step_s"], ".1f"),
        ]
        for r in rows
    ]  # fmt: skip
    headers = ["model", "batch", "variant", "precision", "mode", "median ms", "× FP", "peak act. GB", "× FP",
               "first step s"]  # fmt: skip
    return tabulate(body, headers=headers, tablefmt="github")


def write(rows: list[dict], missing: list[str], left: list[str], rounds: int, seconds: float) -> None:
    text = (
        "# GPU train-step overhead: FP vs fxquant vs torch.ao and torchao (eager and compiled)\n\n"
        f"{rounds} interleaved rounds after {WARMUP} warm-up steps; median step (forward + "
        "cross-entropy + backward + SGD); × FP is against the FP step of the same precision and mode. Peak act. = "
        "peak memory during a step over what was allocated before it. fxquant: calibrated on the GPU; compiled "
        "modes are FXQUANT_COMPILED_QUANTIZER's (fxquant/quant/kernel.py). "
        f"Run took {seconds:.0f} s.\n\n"
        + "\n".join(verdicts(rows))
        + ("\n\nNot measured: " + "; ".join(missing) if missing else "")
        + ("\n\nLeft out (time budget): " + ", ".join(left) if left else "")
        + f"\n\n{table(rows)}\n"
    )
    write_results("gpu_overhead", text, {"rows": rows, "missing": missing, "left_out": left})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {list(MODELS)}")
    parser.add_argument("--compiled", default="llama", help="models also measured compiled (bf16), '' for none")
    parser.add_argument(
        "--modes", default=",".join(fxquant.quant.kernel.COMPILED_MODES), help="compiled quantizer modes to measure"
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--budget", type=float, default=600.0, help="seconds; no model is started past it")
    parser.add_argument("--merge", help="an earlier run's results JSON, whose rows this run's join (eager + compiled)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_overhead.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as users train
    start = time.perf_counter()
    rows: list[dict] = []
    missing: list[str] = []
    if args.merge and Path(args.merge).is_file():
        earlier = json.loads(Path(args.merge).read_text())
        rows, missing = earlier["rows"], earlier["missing"]
    jobs = [(name, False) for name in args.models.split(",") if name]
    jobs += [(name, True) for name in args.compiled.split(",") if name]
    names = [f"{name}{' compiled' if compiled else ''}" for name, compiled in jobs]
    for i, (name, compiled) in enumerate(jobs):
        if time.perf_counter() - start > args.budget:
            write(rows, missing, names[i:], args.rounds, time.perf_counter() - start)
            return
        model_rows, model_missing = bench_model(name, args.rounds, compiled, tuple(args.modes.split(",")))
        rows += model_rows
        missing += model_missing
        write(rows, missing, names[i + 1 :], args.rounds, time.perf_counter() - start)


if __name__ == "__main__":
    main()
