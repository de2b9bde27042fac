"""Run by tests/test_distributed.py under torchrun (2 gloo ranks) and in-process (1 rank), and by tests/test_gpu.py
under torchrun on one GPU (nccl): a tiny QAT fit whose final state each rank writes to OUT_DIR/rank{R}.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import fxquant


class TinyNet(nn.Module):
    """No batch norm: with it, per-rank batch statistics would legitimately differ from one process's."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(
        torch.randn(64, 1, 12, 12, generator=g), torch.randint(0, 10, (64,), generator=g)
    )


CONFIG = {"epochs": 2, "batch_size": 16, "lr": 0.05, "quantizer_lr": 0.01, "weight_decay": 1e-4}


def run(out_dir: Path, mode: str) -> None:
    torch.manual_seed(0)
    qmodel = fxquant.prepare_qat(TinyNet(), "lsq_w4a4")
    history = fxquant.fit(qmodel, dataset(), dataset(), CONFIG, progress=False, distributed_mode=mode)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    written = fxquant.save(qmodel, out_dir / "checkpoint.pt")
    torch.save(
        {
            "state": qmodel.state_dict(),
            "history": [(h.train_loss, h.test_top1, h.test_loss) for h in history],
            "saved": written is not None,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "device": str(fxquant.train.devices.model_device(qmodel)),
        },
        out_dir / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    run(Path(sys.argv[1]), "auto")
