"""The tables of README.md and docs/, made from the results files and fxquant's own declarations — never by hand.

A generated table sits between two markers in a Markdown file::

    <!-- table: NAME -->
    ...
    <!-- /table -->

``NAME`` is ``results/FILE.md`` (the first table of that results file, as its benchmark wrote it, with where it came
from) or one of :data:`MAKERS` (computed from several results files, or from the recipe sections).

    python benchmarks/tables.py            # rewrite every generated table in README.md and docs/*.md
    python benchmarks/tables.py --check    # exit 1 naming each table that differs from its source

``tests/test_docs.py`` runs the check, so a committed table never drifts from its results file.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from fxquant.config import Recipe, describe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"(<!-- table: (?P<name>[^ ]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _first_table(markdown: str) -> str:
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return ""
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def _command_of(markdown: str) -> str:
    found = re.search(r"Command: `([^`]*)`", markdown)
    return found.group(1) if found else "not recorded"


def _source(file: str, prefix: str | None) -> str:
    """A results file named for a page: a link from the README, the path in code type from the docs site (whose
    pages may link only to pages of the site)."""
    return f"`benchmarks/results/{file}`" if prefix is None else f"[{file}]({prefix}benchmarks/results/{file})"


def results_table(file: str, prefix: str | None) -> str:
    """The first table of ``benchmarks/results/<file>`` and a line saying where it came from."""
    path = RESULTS / file
    if not path.is_file():
        return (
            f"*Not measured yet: `benchmarks/results/{file}` has not been committed. It is made by the command "
            f"that `benchmarks/suite.py` lists for it.*\n"
        )
    markdown = path.read_text()
    commit = re.search(r"commit ([0-9a-f]{7,}[+\w]*)", markdown)
    origin = f"`{_command_of(markdown)}`" + (f", commit {commit.group(1)}" if commit else "")
    return f"{_first_table(markdown)}\n\n*From {_source(file, prefix)}: {origin}.*\n"


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def headline(prefix: str | None) -> str:
    """Accuracy, size and speed against the best peer, each from its results file."""
    rows = []
    methods = _load("methods.json")
    if methods:
        fp = statistics.mean(r["top1"] for r in methods["fp"])
        for bits in ("w4a4", "w2a2"):
            by_row: dict[str, list[float]] = {}
            for run in methods["runs"]:
                if run["bits"] == bits:
                    by_row.setdefault(run["row"], []).append(run["top1"])
            lsq = by_row.get("lsq", [])
            best_row, best = max(by_row.items(), key=lambda item: statistics.mean(item[1]))
            model = methods["budget"]["model"]
            ours = f"LSQ {_mean_std(lsq)}" + ("" if best_row == "lsq" else f"; {best_row} {_mean_std(best)}")
            rows.append(
                [f"{bits.upper()} top-1 %, {model} Fashion-MNIST (FP {fp:.2f}; {len(lsq)} seeds)", ours, "—",
                 "methods.json"]
            )  # fmt: skip
    export = _load("export.json")
    if export:
        for row in export["rows"]:
            if row["width"] == "W4A4" and row["model"] == "resnet20":
                rows.append(
                    [
                        f"{row['width']} ONNX file, {row['model']}",
                        f"{row['qdq_bytes'] / 1e3:.0f} kB ({row['qdq_bytes'] / row['fp32_bytes']:.2f}× FP32), "
                        f"onnxruntime agrees on {100 * row['agree_enable_all']:.1f}%",
                        "—",
                        "export.json",
                    ]
                )
    overhead = _load("overhead.json")
    if overhead:
        for model in dict.fromkeys(r["model"] for r in overhead["rows"]):
            eager = {r["variant"]: r for r in overhead["rows"] if r["model"] == model and not r["compiled"]}
            ours = eager.get("fxquant W4A4")
            peers = {k: v for k, v in eager.items() if not k.startswith(("fxquant", "FP32"))}
            if ours and peers:
                best, row = min(peers.items(), key=lambda item: item[1]["ratio_to_fp"])
                rows.append(
                    [
                        f"CPU W4A4 train step × FP, {model} ({ours['batch']})",
                        f"{ours['ratio_to_fp']:.2f}",
                        f"{row['ratio_to_fp']:.2f} ({best})",
                        "overhead.json",
                    ]
                )
    gpu = _load("gpu_overhead.json")
    if gpu:
        for r in gpu["rows"]:
            if r["family"] == "fxquant" and r["precision"] == "bf16" and r["mode"] == "eager" and r["ratio_to_fp"]:
                peers = [p for p in gpu["rows"] if p["model"] == r["model"] and p["family"] in ("torch.ao", "torchao")]
                best = min(peers, key=lambda p: p["ratio_to_fp"] or 1e9) if peers else None
                rows.append(
                    [
                        f"GPU {r['variant'].removeprefix('fxquant ')} bf16 step × FP, {r['model']}",
                        f"{r['ratio_to_fp']:.2f}",
                        f"{best['ratio_to_fp']:.2f} ({best['variant']}, {best['precision']})" if best else "—",
                        "gpu_overhead.json",
                    ]
                )
    else:
        rows.append(["GPU train step × FP", "not measured yet (benchmarks/gpu_overhead.py)", "—", "—"])
    lines = ["| | fxquant | best peer, same run | from |", "|---|---|---|---|"]
    for what, ours, peer, source in rows:
        link = source if source == "—" else _source(source.replace(".json", ".md"), prefix)
        lines.append(f"| {what} | {ours} | {peer} | {link} |")
    return "\n".join(lines) + "\n"


def recipe_keys(prefix: str | None) -> str:
    """Every key a recipe may set, with its type, range and doc (what ``fxquant recipes --keys`` prints)."""
    lines = ["| key | accepts |", "|---|---|"]
    for key, text in describe(Recipe):
        escaped = text.replace("|", "\\|")
        lines.append(f"| `{key}` | {escaped} |")
    return "\n".join(lines) + "\n"


MAKERS: dict[str, Callable[[str | None], str]] = {"headline": headline, "recipe-keys": recipe_keys}


def render(name: str, page: Path) -> str:
    prefix = "" if page.parent == ROOT else None  # the README links results files; the docs site names them
    if name.startswith("results/"):
        return results_table(name.removeprefix("results/"), prefix)
    if name not in MAKERS:
        raise SystemExit(f"{page}: unknown table {name!r}; known: results/FILE.md, {', '.join(MAKERS)}")
    return MAKERS[name](prefix)


def updated(page: Path) -> str:
    text = page.read_text()
    return MARKER.sub(lambda m: m.group(1) + render(m.group("name"), page) + m.group(4), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table is out of date")
    args = parser.parse_args()
    stale = []
    for page in PAGES:
        text, new = page.read_text(), updated(page)
        if text != new:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"out of date (run python benchmarks/tables.py): {', '.join(map(str, stale))}", file=sys.stderr)
        return 1
    if not args.check:
        print(f"rewrote {', '.join(map(str, stale)) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
