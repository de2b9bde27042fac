"""Training: one TrainStep per batch, ``evaluate`` for top-1, ``fit`` for epochs with a schedule.

The optimizer treats three kinds of parameters differently (what LSQ training needs): quantizer steps and
offsets get their own learning rate and no weight decay (decay would pull steps toward zero), batch-norm
and bias parameters get no weight decay, all other weights get the recipe's decay.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from fxquant import coreset, distributed
from fxquant.data import augment_batch
from fxquant.errors import FxQuantError
from fxquant.losses import AuxLoss, Forward, LossInputs
from fxquant.quantizers import FakeQuantizer
from fxquant.sam import SAM, SAMConfig

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 1,
    "batch_size": 128,
    "optimizer": "sgd",
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "schedule": "cosine",
    "warmup_epochs": 0,
    "label_smoothing": 0.0,
}


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, quantizer_lr: float | None = None) -> list[dict]:
    """Optimizer groups: weights (decayed), BN/bias (not decayed), quantizer parameters (own lr, not decayed).

    Example usage::

        optimizer = torch.optim.SGD(fxquant.train.parameter_groups(qmodel, 0.01, 1e-4), lr=0.01, momentum=0.9)
    """
    quantizer_ids = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer) for p in m.parameters()}
    decayed, plain, quant = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in quantizer_ids:
            quant.append(p)
        elif p.dim() <= 1:
            plain.append(p)
        else:
            decayed.append(p)
    groups = [
        {"params": decayed, "weight_decay": weight_decay, "lr": lr, "name": "weights"},
        {"params": plain, "weight_decay": 0.0, "lr": lr, "name": "bn_bias"},
    ]
    if quant:
        groups.append({"params": quant, "weight_decay": 0.0, "lr": quantizer_lr or lr, "name": "quantizers"})
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer a recipe's ``[train]`` table asks for."""
    config = {**TRAIN_DEFAULTS, **config}
    groups = parameter_groups(model, config["lr"], config["weight_decay"], config.get("quantizer_lr"))
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=config["lr"])
    return torch.optim.SGD(groups, lr=config["lr"], momentum=config["momentum"], nesterov=config["momentum"] > 0)


class TrainStep:
    """One optimisation step per call: the views, forwards and losses the model's recipe declares, backward,
    optimizer step. Returns a dict of metrics (one per loss term, plus ``loss`` and ``acc``).

    ``teacher`` (default ``qmodel.teacher``) is the FP teacher of distilling losses; ``losses`` (default
    ``qmodel.losses``) the auxiliary losses; ``extra_losses`` are callables ``(step, x, y, logits) -> dict``
    added to the loss. A batch is ``(x, y)`` or ``(x, x2, y)``: when a loss needs a second view and the batch
    has none, it is made from ``x`` with :func:`fxquant.data.augment_batch` (strong augmentation).
    ``progress`` (fractional epochs, set by ``fit``) drives ramp-ups.

    Example usage::

        step = fxquant.TrainStep(qmodel, optimizer)
        for x, y in loader:
            metrics = step(x, y)      # {"ce": ..., "fpq.csd": ..., "loss": ..., "acc": ...}
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        teacher: nn.Module | None = None,
        losses: Iterable[AuxLoss] | None = None,
        extra_losses: Iterable[Callable[..., dict[str, torch.Tensor]]] = (),
    ):
        self.model = model
        self.student = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.optimizer = optimizer
        self.criterion = criterion or nn.CrossEntropyLoss()
        self.losses = list(losses) if losses is not None else list(getattr(self.student, "losses", []))
        self.teacher = teacher if teacher is not None else getattr(self.student, "teacher", None)
        self.extra_losses = list(extra_losses)
        self.progress = 0.0
        missing = [loss.name for loss in self.losses if loss.teacher_kind == "fp" and self.teacher is None]
        if missing:
            raise ValueError(f"losses {', '.join(missing)} distil from an FP teacher, but none was given")
        self.views = 1 + max((v for loss in self.losses for v in (*loss.student_views, *loss.teacher_views)), default=0)
        recipe = getattr(self.student, "recipe", None)
        sam_table = recipe.data.get("optim", {}).get("sam") if recipe is not None else None
        self.sam = SAM(self.student, SAMConfig.from_recipe(sam_table)) if sam_table is not None else None

    def _forward(self, model: nn.Module, x: torch.Tensor) -> Forward:
        store = getattr(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model, "taps", None)
        if store is not None:
            store.clear()
        logits = model(x)
        return Forward(logits, dict(store) if store is not None else {})

    def _student_forwards(self, views: list[torch.Tensor], which: list[int]) -> dict[int, Forward]:
        # Several views go through the student as one batch: one forward per backward (what DDP requires),
        # and one larger batch is faster than two.
        batch = views[which[0]] if len(which) == 1 else torch.cat([views[v] for v in which])  # no copy for one view
        joint = self._forward(self.model, batch)
        return dict(zip(which, _split(joint, len(which))))

    def __call__(self, *batch: torch.Tensor) -> dict[str, float]:
        *views, y = batch
        while len(views) < self.views:
            views.append(augment_batch(views[0], "strong"))
        self.model.train()
        student_views = sorted({0, *(v for loss in self.losses for v in loss.student_views)})
        teachers: dict[tuple[str, int], Forward] = {}
        first_logits: list[torch.Tensor] = []

        def loss_terms() -> dict[str, torch.Tensor]:
            """Student forward(s) and every loss term; SAM calls it twice, at w and at the perturbed point."""
            forwards = self._student_forwards(views, student_views)
            out = forwards[0].logits
            if not first_logits:  # teachers run once per step, after the student (an EMA copy needs its init)
                first_logits.append(out)
                with torch.no_grad():
                    for loss in self.losses:
                        model = loss.teacher_model(self.student, self.teacher)
                        for v in loss.teacher_views if model is not None else ():
                            if (loss.teacher_kind, v) not in teachers:
                                teachers[(loss.teacher_kind, v)] = self._forward(model, views[v])
            terms = {"ce": self.criterion(out, y)}
            inputs = LossInputs(y, forwards, teachers, self.progress)
            for loss in self.losses:
                terms.update(loss(inputs))
            for extra in self.extra_losses:
                terms.update(extra(self, views[0], y, out))
            return terms

        self.optimizer.zero_grad(set_to_none=True)
        if self.sam is None:
            terms = loss_terms()
            total = sum(terms.values())
            total.backward()
        else:  # SAM: two forward/backward passes; .grad holds the perturbed point's gradient
            terms = self.sam.step(loss_terms)
            total = sum(terms.values())
        self.optimizer.step()
        logits = first_logits[0]
        for loss in self.losses:
            loss.after_step(self.student)
        if getattr(self.student, "taps", None) is not None:
            self.student.taps.clear()  # drop references to this step's activations
        metrics = {name: float(value.detach()) for name, value in terms.items()}
        metrics["loss"] = float(total.detach())
        metrics["acc"] = float((logits.detach().argmax(1) == y).float().mean())
        return metrics


def _split(forward: Forward, parts: int) -> list[Forward]:
    """A forward on concatenated views, split back per view (logits and every batch-shaped tap)."""
    if parts == 1:
        return [forward]

    def chunk(value):
        if isinstance(value, dict):
            pieces = {k: chunk(v) for k, v in value.items()}
            return [{k: pieces[k][i] for k in pieces} for i in range(parts)]
        return list(value.chunk(parts))

    logits = chunk(forward.logits)
    taps = {name: chunk(value) for name, value in forward.taps.items()}
    return [Forward(logits[i], {name: taps[name][i] for name in taps}) for i in range(parts)]


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


def lr_at(epoch_progress: float, config: dict[str, Any]) -> float:
    """Learning-rate multiplier at a fractional epoch: linear warm-up, then cosine to zero or constant."""
    epochs, warmup = config["epochs"], config.get("warmup_epochs", 0)
    if warmup and epoch_progress < warmup:
        return (epoch_progress + 1e-3) / warmup
    if config["schedule"] == "constant":
        return 1.0
    span = max(epochs - warmup, 1e-9)
    return 0.5 * (1 + math.cos(math.pi * min((epoch_progress - warmup) / span, 1.0)))


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
    coreset: Any = None  # the fxquant.coreset.Refresh made before this epoch, if any


def fit(
    model: nn.Module,
    train_data: Any,
    test_data: Any = None,
    config: dict[str, Any] | None = None,
    progress: bool = True,
    description: str = "train",
    *,
    seed: int = 0,
    distributed_mode: str = "auto",
) -> list[EpochRecord]:
    """Train ``model`` for ``config["epochs"]`` epochs (a recipe's ``[train]`` table), evaluating each epoch.

    ``train_data``/``test_data`` are datasets (or, single-process only, DataLoaders). ``batch_size`` is the
    global batch: under ``torchrun --nproc_per_node N`` each rank takes ``batch_size / N`` samples of a
    distributed sampler, gradients are averaged by ``DistributedDataParallel``, quantizers are initialised
    identically on every rank (:func:`fxquant.distributed.initialize_quantizers`), evaluation is sharded,
    and only rank 0 shows progress. Returns one record per epoch (the same on every rank).

    Example usage::

        history = fxquant.fit(qmodel, fashion_mnist("train", augment="standard"), fashion_mnist("test"),
                              qmodel.recipe.train)
    """
    config = {**TRAIN_DEFAULTS, **(config or {})}
    info = distributed.setup(distributed_mode)
    train_loader = _loader(train_data, config["batch_size"], True, seed, info)
    test_loader = _loader(test_data, 512, False, seed, info) if test_data is not None else None
    if len(train_loader) == 0:
        raise ValueError(
            f"the training data ({len(train_loader.dataset)} samples) is smaller than one batch "
            f"({config['batch_size']}); lower batch_size"
        )
    first_x = next(iter(train_loader))[0]
    _search_first(model, train_data, config, bar_console=None if not (progress and info.is_main) else True)
    distributed.initialize_quantizers(model, first_x)
    selector = _coreset_selector(model, config["epochs"])
    if selector is not None:  # ACS: the loader draws from the current selection only
        sampler = coreset.CoresetSampler(torch.arange(len(train_data)), info, seed)
        per_rank = config["batch_size"] // info.world_size
        train_loader = DataLoader(train_data, batch_size=per_rank, sampler=sampler, drop_last=True)
    optimizer = make_optimizer(model, config)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    trained = nn.parallel.DistributedDataParallel(model) if info.enabled else model
    step = TrainStep(trained, optimizer, criterion)
    history: list[EpochRecord] = []
    bar = _progress() if progress and info.is_main else None
    with bar or contextlib.nullcontext():
        task = bar.add_task(description, total=config["epochs"] * len(train_loader)) if bar else None
        for epoch in range(config["epochs"]):
            scoring, refresh = 0.0, None
            if selector is not None and selector.due(epoch):
                refresh = selector.refresh(model, getattr(model, "teacher", None), train_data, epoch)
                train_loader.sampler.set_indices(selector.current)
                scoring = refresh.seconds
                if bar:
                    bar.update(task, total=bar.tasks[0].completed + (config["epochs"] - epoch) * len(train_loader))
                    coreset.report(refresh, bar.console)
            if hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            start, seen, loss_sum, acc_sum = time.perf_counter(), 0, 0.0, 0.0
            for i, batch in enumerate(train_loader):
                y = batch[-1]
                step.progress = epoch + i / len(train_loader)
                scale = lr_at(step.progress, config)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * scale
                metrics = step(*batch)
                if not math.isfinite(metrics["loss"]):  # stop at once: every later step would be NaN too
                    raise FxQuantError(
                        f"training diverged: the loss is {metrics['loss']} at epoch {epoch + 1}, step {i + 1} "
                        f"({description}). A known cause is 2-bit activations whose steps start from the batch "
                        'min/max (MobileNetV2 at W2A2): set quant.activation.init = "mse" in the recipe, or lower '
                        "[train] lr."
                    )
                seen += len(y)
                loss_sum += metrics["loss"] * len(y)
                acc_sum += metrics["acc"] * len(y)
                if bar:
                    rate = seen * info.world_size / (time.perf_counter() - start)
                    bar.update(
                        task,
                        advance=1,
                        description=(
                            f"{description} epoch {epoch + 1}/{config['epochs']} loss {loss_sum / seen:.3f} "
                            f"acc {100 * acc_sum / seen:.1f}% {rate:.0f} img/s"
                        ),
                    )
            seconds = time.perf_counter() - start
            totals = distributed.all_reduce(torch.tensor([seen, loss_sum, acc_sum], dtype=torch.float64)).tolist()
            result = evaluate(model, test_loader) if test_loader is not None else {"top1": None, "loss": None}
            history.append(
                EpochRecord(
                    epoch + 1,
                    totals[1] / totals[0],
                    100 * totals[2] / totals[0],
                    result["top1"],
                    result["loss"],
                    seconds,
                    totals[0] / seconds,
                    scoring,
                    int(totals[0]),
                    refresh,
                )
            )
            if bar and result["top1"] is not None:
                bar.console.print(f"{description} epoch {epoch + 1}: test top-1 {result['top1']:.2f}%")
    return history


def _search_first(model: nn.Module, train_data: Any, config: dict, bar_console) -> None:
    """A recipe's [search]: per-layer bits from sensitivity on a few plain batches, applied before training."""
    recipe = getattr(model, "recipe", None)
    table = recipe.data.get("search") if recipe is not None else None
    if not table or model.__dict__.get("searched"):
        return
    from fxquant import search

    distributed.initialize_quantizers(model, next(iter(DataLoader(train_data, batch_size=config["batch_size"])))[0])
    loader = DataLoader(coreset.plain_view(train_data), batch_size=config["batch_size"], shuffle=False)
    batches = [batch[:1] + batch[-1:] for _, batch in zip(range(table.get("batches", 2)), loader)]
    example = batches[0][0][:1]
    plan, layers = search.search(
        model,
        batches,
        table["budget"],
        table.get("method", "hessian"),
        table.get("candidates", search.DEFAULT_CANDIDATES),
        example_inputs=example,
        rho=table.get("rho", 0.05),
        tol=table.get("tol", 0.05),
        max_iterations=table.get("max_iterations", 50),
        progress=bool(bar_console),
        iterations=table.get("iterations", 100),
        search_first_last=table.get("search_first_last", False),
    )
    search.apply(model, plan)
    # Steps are initialised at the planned widths on the first training batch (as a uniform recipe's are), not
    # rescaled from the recipe's default width: at 2 bits the two differ a lot.
    for q in model.modules():
        if isinstance(q, FakeQuantizer):
            q.initialized.fill_(False)
    model.__dict__["searched"] = plan
    if bar_console:
        search.report(layers, search.parse_budget(table["budget"], layers), plan, table.get("method", "hessian"))


def _coreset_selector(model: nn.Module, epochs: int) -> coreset.CoresetSelector | None:
    recipe = getattr(model, "recipe", None)
    table = recipe.data.get("data", {}).get("coreset") if recipe is not None else None
    if not table:
        return None
    return coreset.CoresetSelector(coreset.CoresetConfig.from_recipe(table), epochs)


def _loader(data: Any, batch_size: int, shuffle: bool, seed: int, info: distributed.DistInfo) -> DataLoader:
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


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn())
