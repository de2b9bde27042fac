"""A wheel built from the repository ships fxquant.passes, the recipes and the kernel sources, and the README's quick
start runs from it in a fresh virtual environment."""

import re
import site
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


def test_the_quick_start_runs_from_the_wheel_in_a_fresh_venv(tmp_path):
    """The built wheel, installed alone into a new venv (its dependencies seen through a path file, never the
    editable checkout), runs the README's quick start."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp_path)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("fxquant-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    own_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(own_site), str(wheel)], check=True
    )
    # torch and friends from this environment, appended after the venv's own packages (a path file's folders are
    # not scanned for path files, so the editable install's finder stays out)
    (own_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    quick_start = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[0]
    script = (
        "import torch, fxquant\n"
        f"assert fxquant.__file__.startswith({str(own_site)!r}), fxquant.__file__\n"
        "loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]\n"
        + quick_start
        + "\nprint(fxquant.__version__, sorted(metrics))\n"
    )
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("0.1.0 ")
