"""The README and the docs site: their examples run as written, their tables match the results files they come from,
and every results file is made by a command that benchmarks/suite.py lists, recording where it was measured."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
RESULTS = ROOT / "benchmarks" / "results"
# Results measured before benchmarks recorded their commit, machine and versions (benchmarks/common.py's
# environment_record): they gain them when made again. This list may only shrink.
LEGACY_RESULTS = {
    "accuracy_mobilenet_v2_small_quick_features_mse_w2a2", "accuracy_mobilenet_v2_small_quick_features_mse_w4a4",
    "accuracy_resnet20_quick", "accuracy_resnet20_quick_features", "accuracy_resnet20_quick_features_cr_warmup",
    "accuracy_resnet20_quick_features_mse_w2a2", "accuracy_resnet20_quick_features_mse_w2a2_cr",
    "accuracy_resnet20_quick_features_mse_w2a2_mec", "accuracy_resnet20_quick_features_mse_w4a4",
    "accuracy_resnet20_quick_features_seeds", "accuracy_resnet20_quick_features_w4a4", "channels_last",
    "coreset_quick", "coreset_quick_w2a2", "methods", "overhead",
    "prepare", "sharpness_budgets_avg2", "sharpness_budgets_avg3", "sharpness_hessian", "sharpness_sam",
    "sharpness_sam_avg2", "sharpness_saq", "vit_fmnist", "zeroshot",
}  # fmt: skip


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", DOCS, ids=[p.stem for p in DOCS])
def test_the_examples_of_each_docs_page_run(page, tmp_path, monkeypatch):
    """A page's Python blocks run in order in one namespace (later blocks use what earlier ones made)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(python_blocks(page)):
        exec(compile(block, f"{page.name}, block {i + 1}", "exec"), namespace)


def test_the_readme_is_an_entry_point():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert re.search(r"^make demo ", text, re.M) and re.search(r"^make test ", text, re.M)
    for target in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", text):
        assert (ROOT / target).is_file(), f"README links {target}, which does not exist"


def test_every_generated_table_matches_its_source():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def _normal(command: str) -> str:
    """A command as the suite would run it: no ``python benchmarks/`` prefix, empty arguments dropped."""
    words = [w for w in shlex.split(command) if w]
    if words[:1] == ["python"]:
        words = words[1:]
    words[0] = words[0].removeprefix("benchmarks/")
    return " ".join(words)


def _recorded_command(stem: str) -> str | None:
    data = json.loads((RESULTS / f"{stem}.json").read_text())
    if "command" in data:
        return data["command"]
    found = re.search(r"Command: `([^`]*)`", (RESULTS / f"{stem}.md").read_text())
    return found.group(1) if found else None


def test_every_results_file_is_made_by_a_listed_command():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import suite
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    listed = {_normal(f"python benchmarks/{c}") for c in (*suite.COMMANDS, *suite.GPU_COMMANDS)}
    stems = {p.stem for p in RESULTS.glob("*.json")}
    assert stems == {p.stem for p in RESULTS.glob("*.md")}, "every results file comes as .md and .json"
    unmade = {}
    for stem in sorted(stems):
        command = _recorded_command(stem)
        if command is None or _normal(command) not in listed:
            unmade[stem] = command
    assert not unmade, f"results files made by no command of benchmarks/suite.py: {unmade}"


def test_new_results_files_record_the_commit_the_machine_and_the_versions():
    for path in sorted(RESULTS.glob("*.json")):
        if path.stem in LEGACY_RESULTS:
            continue
        data = json.loads(path.read_text())
        missing = [key for key in ("command", "commit", "cpu", "versions") if key not in data]
        assert not missing, f"{path.name} lacks {missing} (write it with benchmarks/common.py's write_results)"
    assert {p.stem for p in RESULTS.glob("*.json")} >= LEGACY_RESULTS, "a legacy file is gone: drop its name here"
