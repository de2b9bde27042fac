"""The README's quick start runs as written (with a one-batch loader standing in for the user's data)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example saves a checkpoint
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    loader = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    namespace = {"loader": loader}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert set(namespace["metrics"]) >= {"loss", "acc"}
    assert namespace["float_logits"].shape == (4, 10)
    assert (tmp_path / "resnet18_w4a4.pt").is_file()


def test_every_recipe_shown_in_the_readme_and_the_docs_is_valid():
    import tomllib

    import fxquant

    pages = [README, *sorted((README.parent / "docs").glob("*.md"))]
    blocks = [b for page in pages for b in re.findall(r"```toml\n(.*?)```", page.read_text(), flags=re.S)]
    assert blocks
    for block in blocks:
        fxquant.load_recipe(tomllib.loads(block))
