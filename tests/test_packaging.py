"""A wheel built from the repository imports fxquant.passes and reads every built-in recipe."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_passes_and_recipes(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("fxquant-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fxquant/passes/trace.py" in names
    recipes = {Path(n).stem for n in names if n.startswith("fxquant/recipes/") and n.endswith(".toml")}
    assert {p.stem for p in (ROOT / "recipes").glob("*.toml")} == recipes
    assert "fxquant/assets/resnet20_fashion_mnist.pt" in names  # the demo's FP model
    # the native kernel's sources, compiled on first use
    assert {"fxquant/quant/native/fake_quant.c", "fxquant/quant/native/fake_quant_op.cpp"} <= set(names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    script = (
        f"import sys; sys.path.insert(0, {str(target)!r}); import fxquant, fxquant.passes; "
        f"assert fxquant.__file__.startswith({str(target)!r}), fxquant.__file__; "
        "[fxquant.load_recipe(n) for n in fxquant.builtin_names()]; print(len(fxquant.builtin_names()))"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert int(out.stdout) == len(recipes)
