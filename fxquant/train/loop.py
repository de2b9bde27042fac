"""The epoch loop's parts: data loaders (per-rank under data parallelism), one epoch of steps with the lr
schedule and a progress bar, evaluation, and the record each epoch leaves. :func:`fxquant.fit` composes them.
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
from .optim import lr_at
from .step import TrainStep


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` in eval mode. Under torch.distributed, give
    each rank its own shard of the data: the counts are summed across ranks.

    Example usage::

        fxquant.evaluate(qmodel, test_loader)     # {"top1": 91.2, "loss": 0.25}
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # correct, total, summed loss
    for x, y in loader:
        logits = model(x)
        sums[0] += int((logits.argmax(1) == y).sum())
        sums[1] += len(y)
        sums[2] += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
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


def make_loader(data: Any, batch_size: int, shuffle: bool, seed: int, info: distributed.DistInfo) -> DataLoader:
    """A loader over this rank's share of ``data``: the global batch split across ranks when training, disjoint
    shards when evaluating. A DataLoader is used as it is (single process only)."""
    if isinstance(data, DataLoader):
        if info.enabled:
            raise ValueError(
                "under torch.distributed, fit needs datasets (it builds per-rank samplers), not DataLoaders"
            )
        return data
    if not shuffle and not info.enabled:
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if batch_size % info.world_size:
        raise ValueError(f"batch_size {batch_size} is the global batch: it must divide by the {info.world_size} ranks")
    if shuffle:
        # The same sampler for one process (a world of 1): a run sees the same global batches whatever the
        # number of ranks, so a single-process run is the reference of a data-parallel one.
        sampler = DistributedSampler(data, info.world_size, info.rank, shuffle=True, seed=seed, drop_last=True)
        return DataLoader(data, batch_size=batch_size // info.world_size, sampler=sampler, drop_last=True)
    # evaluation: disjoint shards (no padding duplicates), counts summed by evaluate()
    shard = torch.utils.data.Subset(data, range(info.rank, len(data), info.world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False)


def progress_bar() -> Progress:
    """The rich progress bar ``fit`` shows."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn())


@dataclass
class EpochTotals:
    seen: int = 0
    loss_sum: float = 0.0
    acc_sum: float = 0.0
    seconds: float = 0.0
    metric_sums: dict[str, float] = field(default_factory=dict)  # every step metric, summed × batch size
    metric_counts: dict[str, int] = field(default_factory=dict)  # samples behind each (some are measured sparsely)

    def means(self) -> dict[str, float]:
        return {name: total / max(self.metric_counts[name], 1) for name, total in self.metric_sums.items()}


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
    a non-finite loss stops training at once with the likely cause."""
    totals = EpochTotals()
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        y = batch[-1]
        step.progress = epoch + i / len(loader)
        scale = lr_at(step.progress, config)
        for group, base in zip(step.optimizer.param_groups, base_lrs):
            group["lr"] = base * scale
        metrics = step(*batch)
        if not math.isfinite(metrics["loss"]):  # every later step would be NaN too
            raise TrainingDiverged(
                f"training diverged: the loss is {metrics['loss']} at epoch {epoch + 1}, step {i + 1} "
                f"({description}). A known cause is 2-bit activations whose steps start from the batch "
                'min/max (MobileNetV2 at W2A2): set quant.activation.init = "mse" in the recipe, or lower '
                "[train] lr."
            )
        totals.seen += len(y)
        for name, value in metrics.items():
            totals.metric_sums[name] = totals.metric_sums.get(name, 0.0) + value * len(y)
            totals.metric_counts[name] = totals.metric_counts.get(name, 0) + len(y)
        totals.loss_sum += metrics["loss"] * len(y)
        totals.acc_sum += metrics["acc"] * len(y)
        if bar is not None and task is not None:
            rate = totals.seen * world_size / (time.perf_counter() - start)
            bar.update(
                task,
                advance=1,
                description=(
                    f"{description} epoch {epoch + 1}/{config.epochs} loss {totals.loss_sum / totals.seen:.3f} "
                    f"acc {100 * totals.acc_sum / totals.seen:.1f}% {rate:.0f} img/s"
                ),
            )
    totals.seconds = time.perf_counter() - start
    return totals
