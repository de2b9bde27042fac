"""What every benchmark shares: the presets and the quick setup, the cached FP checkpoints, recipe overrides
from the command line, and the results writer (a Markdown table with its command at the top, plus JSON).

Benchmarks import this module and the shared helpers (``train_steps``, ``peers``, ``baselines``), never each other.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import torch

import fxquant
from fxquant.data import fashion_mnist
from fxquant.workflow import cached_float_model

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(".fxquant_cache")

PRESETS = {
    # train images, FP epochs, QAT epochs
    "quick": {"train_images": 20000, "fp_epochs": 3, "qat_epochs": 2},
    "full": {"train_images": 60000, "fp_epochs": 15, "qat_epochs": 6},
}


def fp_checkpoint(model_name: str, preset: str, seed: int, train_data) -> tuple[torch.nn.Module, float]:
    """The FP model of this preset and seed, trained once and cached. Returns (model, seconds spent training)."""
    settings = PRESETS[preset]
    key = f"{model_name}_fp_{preset}_{settings['train_images']}x{settings['fp_epochs']}_seed{seed}"
    return cached_float_model(
        lambda: fxquant.models.build(model_name),
        key,
        train_data,
        settings["fp_epochs"],
        seed,
        CACHE,
        description=f"FP32 seed {seed}",
    )


def quick_setup(model_name: str = "resnet20", seed: int = 0):
    """What the method benchmarks start from: (training data, FP model, test loader, FP top-1) of the quick preset."""
    train = fashion_mnist("train", augment="standard", limit=PRESETS["quick"]["train_images"])
    fp, _ = fp_checkpoint(model_name, "quick", seed, train)
    test = torch.utils.data.DataLoader(fashion_mnist("test"), batch_size=512)
    return train, fp, test, fxquant.evaluate(fp, test)["top1"]


def parse_sets(items: list[str]) -> dict:
    """``["quant.activation.init=mse"]`` → ``{"quant": {"activation": {"init": "mse"}}}`` (recipe overrides)."""
    overrides: dict = {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        *parents, leaf = key.split(".")
        table = overrides
        for part in parents:
            table = table.setdefault(part, {})
        table[leaf] = value
    return overrides


def mean_std(values: list[float], digits: int = 2) -> str:
    """ "87.10" for one value, "87.10 ± 0.32" (sample standard deviation) for several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def command_line() -> str:
    """How this benchmark was run, for the top of its results, quoted so that it can be pasted into a shell."""
    return shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=RESULTS.parent.parent)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def commit() -> str:
    """The commit measured (``git rev-parse``; ``$FXQUANT_COMMIT`` where the checkout travelled without .git), with
    ``+dirty`` when files other than results differ from it (a suite run rewrites results as it goes)."""
    found = _run(["git", "rev-parse", "--short=12", "HEAD"]) if shutil.which("git") else ""
    if not found:
        return os.environ.get("FXQUANT_COMMIT", "unknown")
    changed = _run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"])
    return found + ("+dirty" if changed else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_record() -> dict[str, Any]:
    """What a results file records about its run: the command, the commit, the machine and the library versions,
    as Markdown (for the top of the file) and as fields (for its JSON).

    Example usage::

        record = environment_record()
        text = f"# My benchmark\n\n{record['markdown']}\n\n..."
    """
    fields: dict[str, Any] = {
        "command": command_line().strip(),
        "commit": commit(),
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "python": platform.python_version(),
        "versions": {
            name: version
            for name in ("torch", "torchvision", "triton", "transformers", "torchao", "onnxruntime")
            if (version := _version(name)) is not None
        },
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
        fields["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
        fields["driver"] = driver[0] if driver else "unknown"
        fields["cuda"] = torch.version.cuda
    versions = ", ".join(f"{name} {version}" for name, version in fields["versions"].items())
    machine = f"GPU {fields['gpu']} (driver {fields['driver']}, CUDA {fields['cuda']}); " if "gpu" in fields else ""
    markdown = (
        f"Command: `{fields['command']}`; commit {fields['commit']}.\n"
        f"Machine: {machine}CPU {fields['cpu']}; Python {fields['python']}; {versions}."
    )
    return {"markdown": markdown, "fields": fields}


def write_results(stem: str, markdown: str, payload: dict[str, Any]) -> Path:
    """Write ``results/<stem>.md`` and ``results/<stem>.json`` and print the Markdown. Both record the command,
    the commit, the machine and the library versions (:func:`environment_record`): the Markdown in a line under
    its title, the JSON as fields.

    Example usage::

        write_results("overhead_cpu", "# Train-step overhead\n\n| model | × FP |\n|---|---|\n", {"rows": rows})
    """
    record = environment_record()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{stem}.md"
    title, _, rest = markdown.partition("\n")
    path.write_text(f"{title}\n\n{record['markdown']}\n{rest}")
    (RESULTS / f"{stem}.json").write_text(json.dumps({**record["fields"], **payload}, indent=1))
    print(path.read_text())
    return path
