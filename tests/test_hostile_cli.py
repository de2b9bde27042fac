"""The CLI on bad input: every command's bad argument or file is one escaped line on stderr and exit status 2,
never a traceback."""

from __future__ import annotations

import pickle

import pytest
import torch

import fxquant
from fxquant.cli import main
from fxquant.models import resnet20


class _RunsCode:
    def __reduce__(self):
        return (print, ("this would have run",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "noise.pt").write_bytes(bytes(range(256)) * 8)
    (folder / "code.pt").write_bytes(pickle.dumps(_RunsCode(), protocol=2))
    torch.save(torch.nn.Linear(3, 2).state_dict(), folder / "other_arch.pt")
    torch.save(resnet20().state_dict(), folder / "fp.pt")
    fxquant.save(fxquant.prepare_qat(resnet20(), "lsq_w4a4"), folder / "qat.pt")
    (folder / "binary.toml").write_bytes(bytes(range(256)))
    (folder / "escape.toml").write_text('extends = "lsq_w4a4"\n"\\u001b]0;title\\u0007" = 1\n')
    (folder / "outside.toml").write_text('extends = "/etc/passwd"\n')
    (folder / "dir.toml").mkdir()
    return folder


BAD = [
    "train --init {f}/noise.pt",
    "train --init {f}/code.pt",
    "train --init {f}",
    "train --init {f}/missing.pt",
    "train --init {f}/qat.pt",
    "train --init {f}/other_arch.pt",
    "train --recipe {f}/binary.toml",
    "train --recipe {f}/escape.toml",
    "train --recipe {f}/outside.toml",
    "train --recipe nosuch_recipe",
    "train --epochs 0",
    "train --lr inf",
    "train --batch-size x",
    "train --model torchvision:no_such_net",
    "train --model \x1b[2J",
    "summary --model resnet20 --input 0,1,28,28",
    "summary --model resnet20 --input a,b",
    "summary --model resnet20 --input 1,3,28,28",
    "summary --model resnet20 --recipe {f}/dir.toml",
    "search --candidates 1,9",
    "search --candidates 2,x",
    "search --budget lots --data random",
    "search --init {f}/noise.pt",
    "search --recipe {f}/escape.toml --data random",
    "zeroshot --model {f}/missing.pt",
    "zeroshot --model {f}/code.pt",
    "zeroshot --model {f}/fp.pt --iterations 0",
    "zeroshot --model {f}/fp.pt --recipe {f}/binary.toml",
    "export --model resnet20 --checkpoint {f}/noise.pt --out {f}/x.onnx",
    "export --model resnet20 --checkpoint {f} --out {f}/x.onnx",
    "export --model resnet20 --checkpoint {f}/fp.pt --out {f}/x.onnx",
    "export --model nope --checkpoint {f}/qat.pt --out {f}/x.onnx",
    "export --model resnet20 --checkpoint {f}/qat.pt --out {f}/x.onnx --input 0,1,28,28",
    "export --model resnet20 --checkpoint {f}/qat.pt --out {f}/x.onnx --opset 0",
    "validate {f}/binary.toml",
    "validate {f}/dir.toml",
    "validate {f}/missing.toml",
    "validate {f}/escape.toml",
    "validate {f}/outside.toml",
    "recipes --bogus",
    "demo --train-images 0",
    "nosuchcommand",
]


@pytest.mark.parametrize("command", BAD)
def test_bad_input_is_one_line_and_exit_2(files, command, capsys):
    argv = [part.format(f=files) for part in command.split(" ")]
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse's usage errors
        status = stop.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, (status, captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].isprintable() and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("fxquant"), lines[0]
    assert "would have run" not in captured.out
