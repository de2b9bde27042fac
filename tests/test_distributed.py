"""Data-parallel fit: 2 gloo ranks on 127.0.0.1 stay identical and match one process on the same global batches."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxquant.quant.quantizers import LSQQuantizer
from fxquant.quant.spec import QuantizerConfig
from fxquant.train import distributed

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(HERE / "ddp_worker.py"), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_ranks_stay_identical(two_rank_run):
    r0, r1 = (torch.load(two_rank_run / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert r0["history"] == r1["history"]


def test_only_rank_zero_saves(two_rank_run):
    r0, r1 = (torch.load(two_rank_run / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["saved"] and not r1["saved"]
    assert (two_rank_run / "checkpoint.pt").is_file()


def test_matches_single_process_on_the_same_global_batches(two_rank_run, tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(HERE))
    ddp_worker.run(tmp_path, "off")
    single = torch.load(tmp_path / "rank0.pt", weights_only=True)
    parallel = torch.load(two_rank_run / "rank0.pt", weights_only=True)
    for key, value in single["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(parallel["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(parallel["state"][key], value), key
    for (loss_p, top1_p, _), (loss_s, top1_s, _) in zip(parallel["history"], single["history"]):
        assert loss_p == pytest.approx(loss_s, rel=1e-4)
        assert top1_p == top1_s


def test_initialisation_statistics_are_reduced():
    """With a reducer that doubles the data (as if a second rank saw the same batch), LSQ's mean |x| and
    the sign decision are unchanged — sums and counts are reduced together."""
    x = torch.randn(8, 4, 5, 5)
    plain, synced = (LSQQuantizer(QuantizerConfig(bits=4)) for _ in range(2))
    plain.initialize(x)
    synced.reduce_statistics = lambda t, op: t * 2 if op == "sum" else t
    synced.initialize(x)
    torch.testing.assert_close(synced.scale, plain.scale)
    assert synced.signed == plain.signed


def test_single_process_setup_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.setup()
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    with pytest.raises(ValueError, match="'auto' or 'off'"):
        distributed.setup("on")
