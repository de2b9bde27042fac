"""ACS — adaptive coreset selection for QAT (Huang et al.): train each epoch on the samples that matter now.

Every training sample is scored in eval mode, without augmentation, with the quantizers initialised:

* error vector score EVS = ‖softmax(f_q(x)) − onehot(y)‖₂ (how wrong the quantized model is),
* disagreement score DS = ‖softmax(f_q(x)) − softmax(f_fp(x))‖₂ (how far it is from the FP model),

combined as d = β(t)·EVS + (1 − β(t))·DS, and the top fraction of each class by d is kept, re-selected every R
epochs. Schedules of β over t ∈ [0, E] epochs, all from 1 (EVS only) to 0 (DS only): ``paper``
β = cos(πt/2E); ``code_cosine`` β = (1 + cos(πt/E))/2, the cosine schedule of the authors' released code
(its DS weight is (1 − cos(πt/E))/2); ``linear`` β = 1 − t/E (the released code's default); ``ds_first``
β = sin(πt/2E), from 0 (DS only) to 1 (EVS only).

Checked against the released code (HuangOwen/QAT-ACS, ``deepcore/methods/adptive_css.py``): the same scores
(L2 norms of softmax − one-hot and of softmax − FP softmax), the same weighting (1 − α)·EVS + α·DS with α
rising from 0, the same per-class top fraction, highest scores first. One difference is not in the formula:
that code makes its first selection at epoch 0, in eval mode, before any training-mode forward has initialised
its LSQ steps (its layers set them only when training), so its first subset is not driven by a meaningful
EVS. ``ds_first`` is our stand-in for a schedule whose first selection EVS does not lead.

Under data parallelism each rank scores its own shard and the scores are summed across ranks, so the
selection is global and identical on every rank; :class:`CoresetSampler` then splits the selected samples
among ranks like a ``DistributedSampler``.

Example usage::

    qmodel = fxquant.prepare_qat(fp_model, "acs10_w4a4")            # [data.coreset] fraction = 0.1
    history = fxquant.fit(qmodel, train_data, test_data, qmodel.recipe.train)   # selection every R epochs
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from fxquant.config.sections import CORESET_SCHEDULES, CoresetConfig

from . import distributed
from .devices import loader_options, model_device, to_device


def evs_weight(epoch: float, epochs: float, schedule: str = "paper") -> float:
    """β(t), the weight of EVS (DS gets 1 − β).

    Example usage::

        evs_weight(0, 10)      # 1.0
        evs_weight(10, 10)     # 0.0 (up to rounding)
    """
    t = min(max(epoch / max(epochs, 1e-9), 0.0), 1.0)
    if schedule == "paper":
        return math.cos(math.pi * t / 2)
    if schedule == "code_cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "linear":
        return 1.0 - t
    if schedule == "ds_first":
        return math.sin(math.pi * t / 2)
    raise ValueError(f"coreset schedule must be one of {CORESET_SCHEDULES}, got {schedule!r}")


@dataclass
class Scores:
    """Per-sample scores (in dataset order) and labels."""

    evs: torch.Tensor
    ds: torch.Tensor | None
    labels: torch.Tensor
    seconds: float = 0.0

    def combined(self, beta: float) -> torch.Tensor:
        if self.ds is None:
            return self.evs
        return beta * self.evs + (1 - beta) * self.ds


def plain_view(dataset: Dataset) -> Dataset:
    """The dataset without train-time augmentation, when it has an ``augment`` switch (fxquant.data does)."""
    if getattr(dataset, "augment", "none") == "none":
        return dataset
    plain = copy.copy(dataset)
    plain.augment = "none"
    return plain


@torch.no_grad()
def score_samples(
    model: nn.Module,
    fp_model: nn.Module | None,
    dataset: Dataset,
    batch_size: int = 512,
    num_classes: int | None = None,
) -> Scores:
    """EVS (and DS when ``fp_model`` is given) of every sample, in eval mode, computed on the model's device (the
    result is on the CPU). Under torch.distributed every rank scores a disjoint shard and gets the whole result.

    Example usage::

        scores = score_samples(qmodel, fp_model, fashion_mnist("train"))
    """
    start = time.perf_counter()
    info = distributed.setup("auto") if torch.distributed.is_initialized() else distributed.DistInfo()
    n = len(dataset)
    indices = list(range(info.rank, n, info.world_size))
    device = model_device(model)
    subset = torch.utils.data.Subset(dataset, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, **loader_options(device))
    evs = torch.zeros(n, dtype=torch.float64, device=device)
    ds = torch.zeros(n, dtype=torch.float64, device=device) if fp_model is not None else None
    labels = torch.zeros(n, dtype=torch.float64, device=device)
    modes = [(m, m.training) for m in (model, fp_model) if m is not None]
    for m, _ in modes:
        m.eval()
    position = 0
    try:
        for batch in loader:
            x, y = to_device((batch[0], batch[-1]), device)
            rows = torch.tensor(indices[position : position + len(y)], device=device)
            position += len(y)
            probs = F.softmax(model(x), dim=1)
            classes = num_classes or probs.shape[1]
            evs[rows] = torch.linalg.vector_norm(probs - F.one_hot(y, classes), dim=1).double()
            if ds is not None:
                ds[rows] = torch.linalg.vector_norm(probs - F.softmax(fp_model(x), dim=1), dim=1).double()
            labels[rows] = y.double()
    finally:
        for m, mode in modes:
            m.train(mode)
    distributed.all_reduce(evs)
    distributed.all_reduce(labels)
    if ds is not None:
        distributed.all_reduce(ds)
    ds = ds.float().cpu() if ds is not None else None
    return Scores(evs.float().cpu(), ds, labels.long().cpu(), time.perf_counter() - start)


def select(scores: torch.Tensor, labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Class-balanced top fraction: in every class the round(fraction · class size) highest-scoring samples
    (ties to the lower index). Returns sorted dataset indices.

    Example usage::

        chosen = select(scores.combined(beta), scores.labels, 0.1)
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"coreset fraction must be in (0, 1], got {fraction}")
    chosen = []
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        budget = max(1, round(fraction * len(members)))
        order = torch.argsort(-scores[members], stable=True)  # stable: ties keep index order
        chosen.append(members[order[:budget]])
    return torch.sort(torch.cat(chosen)).values


def random_subset(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """The class-balanced random subset of the same size as :func:`select` (the baseline ACS must beat)."""
    generator = torch.Generator().manual_seed(seed)
    return select(torch.rand(len(labels), generator=generator, device="cpu"), labels, fraction)


class CoresetSampler(Sampler[int]):
    """Yields this rank's share of the current selection, reshuffled every epoch (seed + epoch)."""

    def __init__(self, indices: torch.Tensor, info: distributed.DistInfo | None = None, seed: int = 0):
        self.info = info or distributed.DistInfo()
        self.seed = seed
        self.epoch = 0
        self.indices = indices

    def set_indices(self, indices: torch.Tensor) -> None:
        self.indices = indices

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices) // self.info.world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = self.indices[torch.randperm(len(self.indices), generator=generator, device="cpu")]
        per_rank = len(self)
        return iter(order[self.info.rank : per_rank * self.info.world_size : self.info.world_size].tolist())


@dataclass
class Refresh:
    """What one selection did, for the report and the history."""

    epoch: int
    beta: float
    selected: int
    changed: int
    seconds: float
    per_class: dict[int, int]
    quantiles: list[float]
    noisy_selected: int | None = None
    noisy_total: int | None = None


@dataclass
class CoresetSelector:
    """Scores, selects and keeps the history of refreshes for one training run."""

    config: CoresetConfig
    epochs: int
    current: torch.Tensor | None = None
    refreshes: list[Refresh] = field(default_factory=list)

    def due(self, epoch: int) -> bool:
        return self.current is None or epoch % self.config.refresh_every == 0

    def refresh(self, model: nn.Module, fp_model: nn.Module | None, dataset: Dataset, epoch: int) -> Refresh:
        fp = fp_model if self.config.needs_fp else None
        if self.config.needs_fp and fp is None:
            raise ValueError("the coreset's disagreement score needs the FP model (qmodel.float_model)")
        scores = score_samples(model, fp, plain_view(dataset))
        if "evs" not in self.config.scores:
            beta = 0.0
        elif "ds" not in self.config.scores:
            beta = 1.0
        else:
            beta = evs_weight(epoch, self.epochs, self.config.schedule)
        combined = scores.combined(beta) if scores.ds is not None else scores.evs
        chosen = select(combined, scores.labels, self.config.fraction)
        previous = set(self.current.tolist()) if self.current is not None else set()
        changed = len(set(chosen.tolist()) - previous) if previous else len(chosen)
        self.current = chosen
        counts = torch.bincount(scores.labels[chosen])
        q = torch.quantile(combined[chosen].double(), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, device="cpu"))
        noisy = getattr(dataset, "noisy", None)
        record = Refresh(
            epoch,
            beta,
            len(chosen),
            changed,
            scores.seconds,
            {int(c): int(n) for c, n in enumerate(counts.tolist()) if n},
            [float(v) for v in q],
            int(noisy[chosen].sum()) if noisy is not None else None,
            int(noisy.sum()) if noisy is not None else None,
        )
        self.refreshes.append(record)
        return record


def report(record: Refresh, console=None) -> None:
    """A rich panel for one refresh: class histogram, score quantiles, churn, scoring time, noisy picks."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"coreset refresh · epoch {record.epoch} · β(EVS) = {record.beta:.3f}", show_header=True)
    for column in ("class", *map(str, record.per_class)):
        table.add_column(column, justify="right")
    table.add_row("selected", *map(str, record.per_class.values()))
    console.print(table)
    lo, mid, hi = record.quantiles
    noisy = (
        f"; noisy labels selected {record.noisy_selected} of {record.selected} "
        f"({100 * record.noisy_selected / max(record.selected, 1):.1f}%, {record.noisy_total} noisy in the data)"
        if record.noisy_selected is not None
        else ""
    )
    console.print(
        f"{record.selected} samples ({record.changed} new), score min/median/max {lo:.3f}/{mid:.3f}/{hi:.3f}, "
        f"scoring {record.seconds:.1f} s{noisy}"
    )


class NoisyLabels(Dataset):
    """A dataset whose labels are replaced, for a fraction of samples, by a uniformly drawn *different* class
    (symmetric noise). ``noisy`` marks which samples were changed.

    Example usage::

        noisy_train = NoisyLabels(fashion_mnist("train", augment="standard"), fraction=0.2, seed=0)
    """

    def __init__(self, dataset: Dataset, fraction: float, num_classes: int = 10, seed: int = 0):
        if not 0 <= fraction <= 1:
            raise ValueError(f"label-noise fraction must be in [0, 1], got {fraction}")
        self.dataset = dataset
        labels = (
            torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], device="cpu")
            if not hasattr(dataset, "labels")
            else dataset.labels.clone()
        )
        generator = torch.Generator().manual_seed(seed)
        count = round(fraction * len(labels))
        chosen = torch.randperm(len(labels), generator=generator, device="cpu")[:count]
        shift = torch.randint(1, num_classes, (count,), generator=generator, device="cpu")
        self.labels = labels.clone()
        self.labels[chosen] = (labels[chosen] + shift) % num_classes
        self.noisy = torch.zeros(len(labels), dtype=torch.bool, device="cpu")
        self.noisy[chosen] = True

    @property
    def augment(self) -> str:
        return getattr(self.dataset, "augment", "none")

    @augment.setter
    def augment(self, value: str) -> None:
        self.dataset = plain_view(self.dataset) if value == "none" else self.dataset

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        x = self.dataset[index][0]
        return x, self.labels[index]
