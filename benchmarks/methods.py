"""The methods table: every research method against LSQ, over QAT seeds, at one budget, with a verdict.

resnet20 on Fashion-MNIST; every QAT run fine-tunes the same FP checkpoint (quick preset, seed 0) for the same
number of epochs over the same images. A row is a recipe (a built-in name or a table extending one), so rows
differ only by what their recipe declares.

Runs are slow (minutes each), so this benchmark keeps a ledger: ``results/methods.json`` holds every finished
run, each with the hash of its fully resolved recipe and the commit it ran at. A call runs only the runs the
ledger lacks, saves after each one, and re-renders ``results/methods.md`` from the ledger. A run whose recipe
no longer resolves to the same text (a method was fixed) is stale: it stays in the ledger but leaves the table.

    python benchmarks/methods.py --rows lsq,lsq_kd,fpq --bits w2a2,w4a4 --seeds 0,1,2
    python benchmarks/methods.py --render            # the table from the ledger, no training
    python benchmarks/methods.py --list              # the rows and the claims they test

Verdict (against the row's baseline, LSQ unless stated, same widths): the difference of means in units of its
standard error sqrt(s1²/n1 + s2²/n2); "confirmed" above +2, "refuted" below −2, else "not confirmed". Fewer than
3 seeds on either side: no verdict.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from common import PRESETS, RESULTS, command_line, commit, fp_checkpoint, mean_std
from tabulate import tabulate

import fxquant
from fxquant import evaluate, fit
from fxquant.config.fields import toml_fields
from fxquant.data import fashion_mnist
from fxquant.train.coreset import NoisyLabels, random_subset

BUDGET = {"model": "resnet20", "train_images": 20000, "fp_epochs": 3, "fp_seed": 0, "qat_epochs": 2}
LEDGER = RESULTS / "methods.json"
WIDTHS = ("w2a2", "w4a4")  # every row's, besides the mixed-precision rows at the BOPs of W3A3
# LRQ's budget (benchmarks/zeroshot.py's): 250 iterations of 32 generated images, the first 50 generator-only; it
# has built-in recipes at W4A4 and W3A3 (at W2A2 the zero-shot student does not recover on this model)
ZEROSHOT = {"iterations": 250, "warmup_iterations": 50, "batch_size": 32, "generator_channels": 32}
ZEROSHOT_STUDENT_STEPS = ZEROSHOT["iterations"] - ZEROSHOT["warmup_iterations"]
ZEROSHOT_WIDTHS = ("w4a4", "w3a3")


@dataclass(frozen=True)
class Row:
    """One method: its recipe at a width, the claim its paper makes and the row that claim is judged against."""

    name: str
    claim: str
    recipe: dict[str, Any] | str = ""  # extra tables over ``lsq_<bits>``; a str names a recipe "<...>_{bits}"
    baseline: str = "lsq"
    widths: tuple[str, ...] = WIDTHS
    random_fraction: float = 0.0  # train on a class-balanced random subset of this fraction (ACS's control)
    noise: float = 0.0  # symmetric label noise on the training data (a fixed draw, the same for every row)
    # "qat": fit on real data for the budget's epochs; "zeroshot": LRQ on generated images only; "matched_real":
    # LSQ on real images for exactly as many student steps of the same batch as the zero-shot rows take
    procedure: str = "qat"

    def recipe_for(self, bits: str) -> dict[str, Any] | str:
        if isinstance(self.recipe, str):
            return self.recipe.format(bits=bits)
        table = {"extends": "lsq_{bits}", **self.recipe}
        return {**table, "name": f"{self.name}_{bits}", "extends": table["extends"].format(bits=bits)}


ROWS = {
    row.name: row
    for row in (
        Row("lsq", "the baseline (LSQ weights, LSQ+ activations)", "lsq_{bits}", baseline="", widths=(*WIDTHS, "w3a3")),
        Row(
            "lsq_kd",
            "control for FPQ: LSQ + logit distillation from the same FP teacher (KD, T = 4)",
            {"loss": [{"kind": "kd", "T": 4.0, "weight": 1.0}]},
        ),
        Row("fpq", "FPQ: feature perturbation + channel-wise standardised distillation beats LSQ", "fpq_{bits}"),
        Row("cr", "CR: consistency with a Mean-Teacher EMA on a strong view beats LSQ", "cr_{bits}"),
        Row("fpq_cr", "FPQ and CR combine: beats FPQ alone", "fpq_cr_{bits}", baseline="fpq"),
        Row("mec", "MEC-Quant: maximum entropy coding of the features of two views beats LSQ", "mec_{bits}"),
        *(
            Row(
                f"mec_{tag}4",
                f"MEC-Quant's mixture of 4 channel-group experts, {what}, beats plain MEC",
                {
                    "extends": "mec_{bits}",
                    "loss": [{"kind": "mec", "tap": "features", "weight": 0.5, "experts": 4, "gate": gate}],
                },
                baseline="mec",
                widths=("w2a2",),
            )
            for tag, gate, what in (
                ("moe", "equal", "equally weighted"),
                ("gate", "learned", "with a learned per-sample gate and its balancing term"),
            )
        ),
        Row("saq", "SAQ: sharpness-aware minimisation of the quantized loss (SAQ's defaults) beats LSQ", "saq_{bits}"),
        *(
            Row(
                f"plan_{method}",
                f"a {method} bit plan at the BOPs of uniform W3A3 (8-bit first/last), LSQ fine-tuning, beats uniform "
                "W3A3",
                {"search": {"method": method, "budget": "avg3"}},
                widths=("w3a3",),
            )
            for method in ("hessian", "sam", "saq")
        ),
        *(
            row
            for noise, tag in ((0.0, ""), (0.2, "_noise20"))
            for row in (
                Row(
                    f"random10{tag}",
                    f"control: a class-balanced random 10% of the data{' with 20% label noise' if noise else ''}",
                    "lsq_{bits}",
                    baseline="",  # a control: what the coreset rows are judged against
                    random_fraction=0.1,
                    noise=noise,
                ),
                Row(
                    f"acs10{tag}",
                    "ACS (EVS → DS, re-selected every epoch) on 10% beats a random 10%"
                    + (" and under-selects noisy samples" if noise else ""),
                    "acs10_{bits}",
                    baseline=f"random10{tag}",
                    noise=noise,
                ),
                Row(
                    f"acs10_kd{tag}",
                    "ACS as its authors train it (KD-only loss, DS-first schedule) on 10% beats a random 10%"
                    + (" and under-selects noisy samples" if noise else ""),
                    {
                        "data": {"coreset": {"fraction": 0.1, "refresh_every": 1, "schedule": "ds_first"}},
                        "train": {"ce_weight": 0.0},
                        "loss": [{"kind": "kd", "T": 4.0}],
                    },
                    baseline=f"random10{tag}",
                    noise=noise,
                ),
            )
        ),
        Row(
            "asam",
            "ASAM variant of SAQ (adaptive neighbourhood, ρ = 0.5) beats LSQ",
            {"optim": {"sam": {"rho": 0.5, "adaptive": True, "perturb": "quantized"}}},
        ),
        Row(
            "real_matched",
            f"control for LRQ: LSQ on real images, {ZEROSHOT_STUDENT_STEPS} steps of {ZEROSHOT['batch_size']} "
            "(as many as LRQ's student takes)",
            "lsq_{bits}",
            baseline="",
            widths=ZEROSHOT_WIDTHS,
            procedure="matched_real",
        ),
        Row(
            "lrq",
            "LRQ: zero-shot QAT on generated images (no real data) beats real-data LSQ with as many student steps "
            "(the paper claims it comes close; the verdict uses the table's beats-the-baseline rule)",
            {"extends": "lrq_{bits}", "zeroshot": ZEROSHOT},
            baseline="real_matched",
            widths=ZEROSHOT_WIDTHS,
            procedure="zeroshot",
        ),
    )
}


def resolved_recipe(row: Row, bits: str) -> fxquant.Recipe:
    return fxquant.load_recipe(row.recipe_for(bits))


# Recipe keys added after the ledger began, as they print at their defaults: removed from the hashed text so that
# runs made before they existed keep their rows. (quant.attention only touches fused attention calls, and
# group_size only per_group weights; resnet20 has neither.) A key whose default changes behaviour must not be here.
KEYS_ADDED_LATER = (
    ", group_size=32",
    ", group_size=None",
    "attention='fused', ",
    ", compile=False",
    ", gate='equal', balance=1.0",
    ", activation_scheme=None",
)


def recipe_hash(recipe: fxquant.Recipe) -> str:
    """What identifies a row's method: every key of the resolved recipe, defaults included (a default that
    changes in the code changes the hash, so runs made before it leave the table)."""
    sections = tuple((f.name, getattr(recipe, f.name)) for f in toml_fields(type(recipe)) if f.name != "name")
    text = repr(sections)
    for added in KEYS_ADDED_LATER:  # at their defaults they change nothing a row computes
        text = text.replace(added, "")
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def row_hash(row: Row, bits: str) -> str:
    """The recipe's hash, plus the row's data settings when it has any (a subset or label noise)."""
    base = recipe_hash(resolved_recipe(row, bits))
    if row.procedure == "matched_real":
        data = f"{base}|matched_real={ZEROSHOT_STUDENT_STEPS}x{ZEROSHOT['batch_size']}"
    elif not (row.random_fraction or row.noise):
        return base
    else:
        data = f"{base}|random={row.random_fraction}|noise={row.noise}"
    return hashlib.sha256(data.encode()).hexdigest()[:12]


def load_ledger() -> dict[str, Any]:
    if LEDGER.exists():
        ledger = json.loads(LEDGER.read_text())
        if ledger["budget"] != BUDGET:
            raise SystemExit(f"{LEDGER}: its budget {ledger['budget']} is not this script's {BUDGET}; move it aside")
        return ledger
    return {"budget": BUDGET, "fp": [], "runs": []}


def record(run: dict[str, Any] | None = None, fp: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add a finished run (or the FP row) to the ledger on disk and return the ledger. Several processes may run
    rows at once (one per core): each addition re-reads the file under a lock, so none overwrites another's."""
    RESULTS.mkdir(exist_ok=True)
    with open(LEDGER.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ledger = load_ledger()
        if run is not None:
            ledger["runs"].append(run)
        if fp is not None and not ledger["fp"]:
            ledger["fp"].append(fp)
        temporary = LEDGER.with_suffix(".json.partial")
        temporary.write_text(json.dumps(ledger, indent=1))
        temporary.replace(LEDGER)  # a run killed mid-write never leaves half a ledger
    return ledger


def run_zeroshot(row: Row, qmodel, seed: int, train_data) -> tuple[float, float, float, dict[str, float]]:
    """A zero-shot row (LRQ, seeded by the run's seed) or its real-data control with as many student steps.
    Returns (seconds, student images per second, last loss, metrics)."""
    images = ZEROSHOT_STUDENT_STEPS * ZEROSHOT["batch_size"]
    if row.procedure == "zeroshot":
        result = fxquant.zeroshot.train(qmodel, {"seed": seed}, progress=False)
        last = result.history[-1]
        return result.seconds, images / result.seconds, last["student_kd"], {"agreement": last["agreement"]}
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed))[:images]
    subset = torch.utils.data.Subset(train_data, order.tolist())
    config = qmodel.recipe.train.override(epochs=1, batch_size=ZEROSHOT["batch_size"])
    start = time.perf_counter()
    history = fit(qmodel, subset, None, config, description=f"{row.name} seed {seed}", seed=seed)
    seconds = time.perf_counter() - start
    return seconds, images / seconds, history[-1].train_loss, history[-1].metrics


def run_qat(row: Row, bits: str, qmodel, seed: int, train_data) -> tuple[float, float, float, dict, float | None]:
    """A QAT row: ``fit`` for the budget's epochs on the row's data (all of it, or a random subset, with or without
    label noise). Returns (seconds, images per second, last loss, metrics, share of noisy labels trained on)."""
    config = qmodel.recipe.train.override(epochs=BUDGET["qat_epochs"])
    data = NoisyLabels(train_data, row.noise, seed=0) if row.noise else train_data  # one noise draw for all rows
    chosen = random_subset(data.labels, row.random_fraction, seed) if row.random_fraction else None
    subset = torch.utils.data.Subset(data, chosen.tolist()) if chosen is not None else data
    start = time.perf_counter()
    history = fit(qmodel, subset, None, config, description=f"{row.name} {bits} seed {seed}", seed=seed)
    seconds = time.perf_counter() - start
    noisy_share = None
    if row.noise:
        picks = [h.coreset for h in history if h.coreset is not None]
        if picks:
            noisy_share = sum(r.noisy_selected for r in picks) / max(sum(r.selected for r in picks), 1)
        elif chosen is not None:
            noisy_share = float(data.noisy[chosen].float().mean())
    speed = statistics.mean(h.images_per_second for h in history)
    return seconds, speed, history[-1].train_loss, history[-1].metrics, noisy_share


def run_one(row: Row, bits: str, seed: int, fp_model, train_data, test_loader, code: str) -> dict[str, Any]:
    recipe = resolved_recipe(row, bits)
    torch.manual_seed(seed)
    qmodel = fxquant.prepare_qat(fp_model, recipe, torch.randn(1, 1, 28, 28))
    if row.procedure == "qat":
        seconds, speed, loss, metrics, noisy_share = run_qat(row, bits, qmodel, seed, train_data)
    else:
        (seconds, speed, loss, metrics), noisy_share = run_zeroshot(row, qmodel, seed, train_data), None
    return {
        "row": row.name,
        "bits": bits,
        "seed": seed,
        "recipe_hash": row_hash(row, bits),
        "commit": code,
        "top1": evaluate(qmodel, test_loader)["top1"],
        "seconds": seconds,
        "images_per_second": speed,  # student images (real or generated) per second
        "train_loss": loss,
        "noisy_share": noisy_share,  # of the samples trained on, when the data has label noise
        "metrics": metrics,
        "threads": torch.get_num_threads(),
    }


def current_runs(ledger: dict[str, Any], row: Row, bits: str) -> list[dict[str, Any]]:
    """The ledger's runs of this row and width made with the recipe as it resolves today."""
    wanted = row_hash(row, bits)
    return [r for r in ledger["runs"] if r["row"] == row.name and r["bits"] == bits and r["recipe_hash"] == wanted]


def verdict(mine: list[float], base: list[float]) -> str:
    if len(mine) < 3 or len(base) < 3:
        return "— (< 3 seeds)"
    difference = statistics.mean(mine) - statistics.mean(base)
    error = math.sqrt(statistics.variance(mine) / len(mine) + statistics.variance(base) / len(base))
    z = difference / error if error > 0 else math.copysign(math.inf, difference) if difference else 0.0
    word = "confirmed" if z > 2 else "refuted" if z < -2 else "not confirmed"
    return f"{word} ({difference:+.2f} pt, {z:+.1f} SE)"


def diagnostics(runs: list[dict[str, Any]]) -> str:
    """What shows whether a method acted: a regulariser's gradient ratio to CE, a teacher's accuracy, the share of
    noisy labels among the samples trained on."""
    values: dict[str, list[float]] = {}
    for run in runs:
        for key, value in (run.get("metrics") or {}).items():
            if key.endswith(("grad_ratio", "teacher_acc", "gate_max_share")) and math.isfinite(value):
                values.setdefault(key, []).append(value)
        if run.get("noisy_share") is not None:
            values.setdefault("noisy share", []).append(run["noisy_share"])
    return ", ".join(f"{key} {statistics.mean(v):.3g}" for key, v in sorted(values.items())) or "—"


def render(ledger: dict[str, Any]) -> str:
    fp = [r["top1"] for r in ledger["fp"]]
    table = [["FP32", "32/32", mean_std(fp[:1]) if fp else "—", "—", "—", "—", "—", "—"]]
    stale = 0
    for bits in (*WIDTHS, "w3a3"):
        for row in ROWS.values():
            if bits not in row.widths:
                continue
            mine = current_runs(ledger, row, bits)
            stale += sum(1 for r in ledger["runs"] if r["row"] == row.name and r["bits"] == bits) - len(mine)
            if not mine:
                continue
            base_runs = current_runs(ledger, ROWS[row.baseline], bits) if row.baseline else []
            # a run paused while it trained (to time something else alone) has no meaningful speed
            speed = {r["seed"]: r["images_per_second"] for r in base_runs if not r.get("paused_seconds")}
            cost = [
                speed[r["seed"]] / r["images_per_second"]
                for r in mine
                if r["seed"] in speed and not r.get("paused_seconds")
            ]
            top1 = [r["top1"] for r in mine]
            table.append(
                [
                    row.name,
                    bits.upper(),
                    mean_std(top1),
                    len(mine),
                    f"{statistics.mean(cost):.2f}" if cost else "—",
                    row.baseline or "—",
                    verdict(top1, [r["top1"] for r in base_runs]) if row.baseline else "—",
                    diagnostics(mine),
                ]
            )
    headers = [
        "row",
        "bits",
        "top-1 % (mean ± std)",
        "seeds",
        "time per step × baseline",
        "baseline",
        "verdict",
        "last-epoch diagnostics (mean)",
    ]
    claims = "\n".join(f"- **{row.name}**: {row.claim}" for row in ROWS.values())
    return (
        "# Methods: each research method against LSQ, over QAT seeds\n\n"
        f"Command: `{command_line().strip()}` (the table renders every run in `methods.json`; runs accumulate "
        f"over calls). Budget: {BUDGET['model']}, {BUDGET['train_images']} Fashion-MNIST training images "
        f"(standard augmentation), every QAT run {BUDGET['qat_epochs']} epochs from one FP checkpoint "
        f"({BUDGET['fp_epochs']} epochs, seed {BUDGET['fp_seed']}); test set 10,000 images; torch {torch.__version__}."
        " Accuracy runs shared the 2 cores with other work, so the per-step ratios (against the baseline run of the "
        "same seed) are indicative only. Verdict: difference of means over its standard error, ±2 SE.\n\n"
        f"{tabulate(table, headers=headers, tablefmt='github')}\n\n"
        + (f"{stale} earlier run(s) of changed recipes are kept in methods.json but left out.\n\n" if stale else "")
        + f"Rows and the claims they test:\n\n{claims}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (see --list)")
    parser.add_argument("--bits", default=",".join((*WIDTHS, "w3a3")), help="widths to run (each row runs its own)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render", action="store_true", help="only render the table from the ledger")
    parser.add_argument("--list", action="store_true", help="print the rows and their claims")
    args = parser.parse_args()
    if args.list:
        for row in ROWS.values():
            print(f"{row.name:10} vs {row.baseline or '—':6} {row.claim}")
        return
    torch.set_num_threads(args.threads)
    ledger = load_ledger()
    code = commit()  # at start: the code this process runs, whatever is edited while it trains
    rows = [ROWS[name] for name in args.rows.split(",")] if not args.render else []
    bits_list = args.bits.split(",")
    for row in rows:  # fail on a typo before an hour of training
        for bits in bits_list:
            resolved_recipe(row, bits)
    if rows:
        train_data = fashion_mnist("train", augment="standard", limit=BUDGET["train_images"])
        test_loader = torch.utils.data.DataLoader(fashion_mnist("test"), batch_size=512)
        fp_model, _ = fp_checkpoint(BUDGET["model"], "quick", BUDGET["fp_seed"], train_data)
        assert PRESETS["quick"]["train_images"] == BUDGET["train_images"]
        if not ledger["fp"]:
            ledger = record(fp={"seed": BUDGET["fp_seed"], "top1": evaluate(fp_model, test_loader)["top1"]})
        for seed in (int(s) for s in args.seeds.split(",")):
            for bits in bits_list:
                for row in rows:
                    ledger = load_ledger()  # another process may have run it meanwhile
                    if bits not in row.widths or any(r["seed"] == seed for r in current_runs(ledger, row, bits)):
                        continue
                    run = run_one(row, bits, seed, fp_model, train_data, test_loader, code)
                    ledger = record(run)
                    print(f"{row.name} {bits} seed {seed}: top-1 {run['top1']:.2f}%", flush=True)
                    (RESULTS / "methods.md").write_text(render(ledger))
    text = render(ledger)
    (RESULTS / "methods.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
