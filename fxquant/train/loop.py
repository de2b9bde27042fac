"""The epoch loop's parts: data loaders (per-rank under data parallelism), one epoch of steps with the lr
schedule and a progress bar, evaluation, and the record each epoch leaves. :func:`fxquant.fit` composes them.

Everything runs where the model is: batches are moved to its device, and sums (losses, accuracies, metrics) are
kept there, read on the host only when the progress bar is redrawn (about twice a second) and at the end of an
epoch, so that a GPU is never made to wait for the host within a stretch of steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from fxquant.config.sections import TrainConfig
from fxquant.errors import FxQuantError

from . import distributed
from .devices import loader_options, model_device, to_device
from .optim import lr_at
from .step import TrainStep

REFRESH_SECONDS = 0.5  # how often the progress bar (and the divergence check) reads the running sums


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` in eval mode, on the model's device (each batch is
    moved there). Under torch.distributed, give each rank its own shard of the data: the counts are summed across
    ranks.

    Example usage::

        fxquant.evaluate(qmodel, test_loader)     # {"top1": 91.2, "loss": 0.25}
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, total, summed loss
    for batch in loader:
        x, y = to_device((batch[0], batch[-1]), device)
        logits = model(x)
        sums[0] += (logits.argmax(1) == y).sum()
        sums[1] += len(y)
        sums[2] += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
    model.train(was_training)
    correct, total, loss = distributed.all_reduce(sums).tolist()
    return {"top1": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1)}


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_acc: float
    test_top1: float | None
    test_loss: float | None
    seconds: float
    images_per_second: float
    scoring_seconds: float = 0.0  # coreset scoring before this epoch (not in ``seconds``)
    train_samples: int = 0
    coreset: Any = None  # the fxquant.train.coreset.Refresh made before this epoch, if any
    metrics: dict[str, float] = field(default_factory=dict)  # epoch means of the step metrics (loss terms, ...)


class TrainingDiverged(FxQuantError):
    """The training loss became NaN or infinite."""


def make_loader(
    data: Any,
    batch_size: int,
    shuffle: bool,
    seed: int,
    info: distributed.DistInfo,
    device: torch.device | None = None,
) -> DataLoader:
    """A loader over this rank's share of ``data``: the global batch split across ranks when training, disjoint
    shards when evaluating; with pinned memory and worker processes when it feeds a GPU. A DataLoader is used as
    it is (single process only)."""
    if isinstance(data, DataLoader):
        if info.enabled:
            raise ValueError(
                "under torch.distributed, fit needs datasets (it builds per-rank samplers), not DataLoaders"
            )
        return data
    options = loader_options(device) if device is not None else {}
    if not shuffle and not info.enabled:
        return DataLoader(data, batch_size=batch_size, shuffle=False, **options)
    if batch_size % info.world_size:
        raise ValueError(f"batch_size {batch_size} is the global batch: it must divide by the {info.world_size} ranks")
    if shuffle:
        # The same sampler for one process (a world of 1): a run sees the same global batches whatever the
        # number of ranks, so a single-process run is the reference of a data-parallel one.
        sampler = DistributedSampler(data, info.world_size, info.rank, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(data, batch_size=batch_size // info.world_size, sampler=sampler, drop_last=True, **options)
    # evaluation: disjoint shards (no padding duplicates), counts summed by evaluate()
    shard = torch.utils.data.Subset(data, range(info.rank, len(data), info.world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, **options)


def progress_bar() -> Progress:
    """The rich progress bar ``fit`` shows."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn())


@dataclass
class EpochTotals:
    """What one epoch's steps add up, kept on the model's device until read (:meth:`means`, :attr:`loss_sum`)."""

    seen: int = 0
    seconds: float = 0.0
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # every step metric, summed × batch size
    metric_counts: dict[str, int] = field(default_factory=dict)  # samples behind each (some are measured sparsely)

    def add(self, metrics: dict[str, Any], samples: int) -> None:
        self.seen += samples
        for name, value in metrics.items():
            previous = self.metric_sums.get(name)
            self.metric_sums[name] = value * samples if previous is None else previous + value * samples
            self.metric_counts[name] = self.metric_counts.get(name, 0) + samples

    def mean(self, name: str) -> float:
        """The running mean of one metric (reads it from the device)."""
        return float(self.metric_sums[name]) / max(self.metric_counts[name], 1)

    def means(self) -> dict[str, float]:
        return {name: self.mean(name) for name in self.metric_sums}

    @property
    def loss_sum(self) -> float:
        return float(self.metric_sums["loss"]) if "loss" in self.metric_sums else 0.0

    @property
    def acc_sum(self) -> float:
        return float(self.metric_sums["acc"]) if "acc" in self.metric_sums else 0.0


def run_epoch(
    step: TrainStep,
    loader: DataLoader,
    epoch: int,
    config: TrainConfig,
    base_lrs: list[float],
    description: str,
    bar: Progress | None = None,
    task: TaskID | None = None,
    world_size: int = 1,
) -> EpochTotals:
    """One pass over ``loader``: the lr of each optimizer group follows the schedule at the fractional epoch;
    a non-finite loss stops training with the likely cause (checked when the progress is read: after the first
    step, about twice a second, and at the end of the epoch)."""
    totals = EpochTotals()
    start = last_read = time.perf_counter()
    for i, batch in enumerate(loader):
        y = batch[-1]
        step.progress = epoch + i / len(loader)
        scale = lr_at(step.progress, config)
        for group, base in zip(step.optimizer.param_groups, base_lrs):
            group["lr"] = base * scale
        totals.add(step(*batch), len(y))
        now = time.perf_counter()
        last = i + 1 == len(loader)
        if i == 0 or last or now - last_read >= REFRESH_SECONDS:
            last_read = now
            _check_finite(totals, epoch, i, description)
            if bar is not None and task is not None:
                bar.update(
                    task,
                    description=(
                        f"{description} epoch {epoch + 1}/{config.epochs} loss {totals.mean('loss'):.3f} "
                        f"acc {100 * totals.mean('acc'):.1f}% {totals.seen * world_size / (now - start):.0f} img/s"
                    ),
                )
        if bar is not None and task is not None:
            bar.advance(task)
    totals.seconds = time.perf_counter() - start
    return totals


def _check_finite(totals: EpochTotals, epoch: int, index: int, description: str) -> None:
    loss = totals.mean("loss")
    if not math.isfinite(loss):  # every later step would be NaN too
        raise TrainingDiverged(
            f"training diverged: the loss is {loss} by epoch {epoch + 1}, step {index + 1} ({description}). A known "
            "cause is 2-bit activations whose steps start from the batch min/max (MobileNetV2 at W2A2): set "
            'quant.activation.init = "mse" in the recipe, or lower [train] lr.'
        )
