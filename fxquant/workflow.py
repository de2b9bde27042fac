"""``fit`` and ``calibrate``: the run a recipe declares, composed from the rooms below.

``fit`` sets up data parallelism, the device and precision, and loaders, runs a recipe's ``[search]`` (once: a
model that already has a bit plan keeps it), calibrates the quantizers, builds the teacher and coreset selection
the recipe asks for, then trains epoch by epoch (:mod:`fxquant.train.loop`) and evaluates.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fxquant.config.fields import Where, parse
from fxquant.config.sections import TrainConfig
from fxquant.errors import FxQuantError
from fxquant.qat_model import QATModel
from fxquant.quant.controls import quantizers_of
from fxquant.quant.quantizers import ObserverQuantizer
from fxquant.search.from_recipe import search_for_recipe
from fxquant.train import coreset, distributed
from fxquant.train.devices import Precision, loader_options, resolve_device
from fxquant.train.loop import EpochRecord, evaluate, make_loader, progress_bar, run_epoch
from fxquant.train.optim import make_optimizer
from fxquant.train.step import TrainStep
from fxquant.train.teachers import float_teacher


def calibrate(model: nn.Module, *inputs: Any, max_batches: int = 8) -> int:
    """Initialise the quantizers before training, eagerly: LSQ steps from the first batch, observer ranges from
    up to ``max_batches`` batches (forwards in training mode without gradients; batch-norm statistics are left
    as they were; statistics are reduced across data-parallel ranks). ``inputs`` are one batch of model inputs,
    or a single iterable of batches (a DataLoader; a batch is a tensor or an ``(x, y, ...)`` tuple whose first
    item is the input); batches are moved to the model's device. Returns how many quantizers were initialised.
    ``fit`` calls it on its first batch; call it yourself before ``torch.compile(qmodel)`` or a training loop of
    your own.

    Example usage::

        fxquant.calibrate(qmodel, train_loader)            # or fxquant.calibrate(qmodel, x)
        compiled = torch.compile(qmodel)
    """
    if max_batches < 1:
        raise ValueError(f"max_batches must be ≥ 1, got {max_batches}")
    if len(inputs) == 1 and not isinstance(inputs[0], torch.Tensor):
        batches = (_model_inputs(batch) for batch in inputs[0])
        first = next(batches, None)
        if first is None:
            raise ValueError("calibrate: the iterable of batches is empty")
        initialised = distributed.initialize_quantizers(model, *first)
        if any(isinstance(q, ObserverQuantizer) and q.observing for q in quantizers_of(model).values()):
            for _, more in zip(range(max_batches - 1), batches):
                distributed.observe(model, *more)
        return initialised
    return distributed.initialize_quantizers(model, *inputs)


def _model_inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    """The model inputs of one batch of a loader: the tensor itself, or the first item of a tuple."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)
    raise TypeError(f"calibrate: a batch must be a tensor or an (x, y, ...) tuple, got {type(batch).__name__}")


def train_config(model: nn.Module, config: TrainConfig | Mapping[str, Any] | None) -> TrainConfig:
    """The ``[train]`` settings of a run: ``config`` as given (a mapping is validated as a ``[train]`` table on
    top of the recipe's), else the model's recipe's, else the defaults."""
    base = model.recipe.train if isinstance(model, QATModel) else TrainConfig()
    if config is None:
        return base
    if isinstance(config, TrainConfig):
        return config
    return parse(TrainConfig, dict(config), Where("fit(config=...)", "train"), base=base)


def fit(
    model: nn.Module,
    train_data: Any,
    test_data: Any = None,
    config: TrainConfig | Mapping[str, Any] | None = None,
    progress: bool = True,
    description: str = "train",
    *,
    seed: int = 0,
    distributed_mode: str = "auto",
    compile: bool | None = None,
    device: str | torch.device | None = None,
) -> list[EpochRecord]:
    """Train ``model`` for ``config.epochs`` epochs (default: its recipe's ``[train]``), evaluating each epoch.

    ``train_data``/``test_data`` are datasets (or, single-process only, DataLoaders). ``batch_size`` is the
    global batch: under ``torchrun --nproc_per_node N`` each rank takes ``batch_size / N`` samples of a
    distributed sampler, gradients are averaged by ``DistributedDataParallel``, quantizers are initialised
    identically on every rank, evaluation is sharded, and only rank 0 shows progress. Works for a float model
    too (no recipe: plain training). Returns one record per epoch (the same on every rank).

    The model is moved to ``device`` (default: the config's ``device``, ``"auto"``: the model's GPU if it is on
    one, else this process's CUDA device when there is one, else the CPU), and every batch follows it; the
    config's ``precision`` (``fp32``, ``bf16``, ``fp16``) runs the forwards under autocast (fp16 with a gradient
    scaler). The quantizers are calibrated on the first batch before the first step. ``compile=True`` (default:
    the config's ``compile``) then trains through ``torch.compile``: the quantizers trace without graph breaks, so
    the compiler can fuse each quantize-dequantize into its neighbours. Evaluation stays eager.

    Example usage::

        history = fxquant.fit(qmodel, fashion_mnist("train", augment="standard"), fashion_mnist("test"))
        history = fxquant.fit(qmodel, train, test, {"precision": "bf16"}, device="cuda")
    """
    config = train_config(model, config)
    if compile is not None:
        config = config.override(compile=compile)
    info = distributed.setup(distributed_mode)
    target = resolve_device(device if device is not None else config.device, model)
    precision = Precision.of(config.precision, target)  # refused before anything moves or trains
    model.to(target)
    train_loader = make_loader(train_data, config.batch_size, True, seed, info, target)
    test_loader = make_loader(test_data, 512, False, seed, info, target) if test_data is not None else None
    if len(train_loader) == 0:
        raise ValueError(
            f"the training data ({len(train_loader.dataset)} samples) is smaller than one batch "
            f"({config.batch_size}); lower batch_size"
        )
    shows = progress and info.is_main
    recipe = model.recipe if isinstance(model, QATModel) else None
    first_x = next(iter(train_loader))[0]
    if recipe is not None and recipe.search is not None and model.bit_plan is None:
        search_for_recipe(model, train_data, config.batch_size, progress=shows)
    calibrate(model, first_x)
    optimizer = make_optimizer(model, config)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    trained = model
    if info.enabled:  # one device per rank
        device_ids = [target.index] if target.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if config.compile:
        trained = torch.compile(trained)
    step = TrainStep(trained, optimizer, criterion, ce_weight=config.ce_weight, precision=precision)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # after TrainStep: it adds the losses' own parameters
    step.total_epochs = float(config.epochs)
    selector, train_loader = _coreset(target, recipe, train_data, train_loader, config, seed, info)
    scorer = _coreset_teacher(model, step) if selector is not None else None
    history: list[EpochRecord] = []
    bar = progress_bar() if shows else None
    with bar or contextlib.nullcontext():
        task = bar.add_task(description, total=config.epochs * len(train_loader)) if bar else None
        for epoch in range(config.epochs):
            scoring, refresh = 0.0, None
            if selector is not None and selector.due(epoch):
                refresh = selector.refresh(model, scorer, train_data, epoch)
                train_loader.sampler.set_indices(selector.current)
                scoring = refresh.seconds
                if bar:
                    bar.update(task, total=bar.tasks[0].completed + (config.epochs - epoch) * len(train_loader))
                    coreset.report(refresh, bar.console)
            if hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            totals = run_epoch(step, train_loader, epoch, config, base_lrs, description, bar, task, info.world_size)
            summed = torch.tensor([totals.seen, totals.loss_sum, totals.acc_sum], dtype=torch.float64, device=target)
            seen, loss_sum, acc_sum = distributed.all_reduce(summed).tolist()
            result = evaluate(model, test_loader) if test_loader is not None else {"top1": None, "loss": None}
            history.append(
                EpochRecord(
                    epoch + 1,
                    loss_sum / seen,
                    100 * acc_sum / seen,
                    result["top1"],
                    result["loss"],
                    totals.seconds,
                    seen / totals.seconds,
                    scoring,
                    int(seen),
                    refresh,
                    totals.means(),  # this process's means (diagnostics, not reduced across ranks)
                )
            )
            if bar and result["top1"] is not None:
                bar.console.print(f"{description} epoch {epoch + 1}: test top-1 {result['top1']:.2f}%")
    return history


def _coreset(
    device: torch.device,
    recipe: Any,
    train_data: Any,
    train_loader: DataLoader,
    config: TrainConfig,
    seed: int,
    info: distributed.DistInfo,
) -> tuple[coreset.CoresetSelector | None, DataLoader]:
    """ACS: a selector and a loader that draws from its current selection only (or None and the loader)."""
    if recipe is None or recipe.coreset is None:
        return None, train_loader
    selector = coreset.CoresetSelector(recipe.coreset, config.epochs)
    sampler = coreset.CoresetSampler(torch.arange(len(train_data), device="cpu"), info, seed)
    per_rank = config.batch_size // info.world_size
    loader = DataLoader(train_data, batch_size=per_rank, sampler=sampler, drop_last=True, **loader_options(device))
    return selector, loader


def _coreset_teacher(model: QATModel, step: TrainStep) -> nn.Module | None:
    """The float model the disagreement score compares with: the step's FP teacher, or one built for it."""
    if not model.recipe.coreset.needs_fp:
        return None
    if step.teacher is not None:
        return step.teacher
    if model.float_model is None:
        raise FxQuantError(
            "the coreset's disagreement score needs the float model: prepare_qat(..., float_model=fp_model)"
        )
    return float_teacher(model, model.float_model)


# The float training every cached model gets (SGD, cosine; a higher lr than QAT fine-tuning).
FLOAT_TRAINING = TrainConfig(lr=0.1, weight_decay=5e-4, batch_size=128, schedule="cosine")


def cached_float_model(
    build: Callable[[], nn.Module],
    key: str,
    train_data: Any,
    epochs: int,
    seed: int = 0,
    cache: str | Path = ".fxquant_cache",
    description: str = "FP32",
    config: TrainConfig | None = None,
) -> tuple[nn.Module, float]:
    """(model, seconds spent training): ``build()`` with the weights in ``cache/<key>.pt`` when that file exists,
    else trained by :func:`fit` for ``epochs`` with ``config`` (default :data:`FLOAT_TRAINING`; seeded) and
    saved there. What the
    demo and the benchmarks start QAT from; ``key`` must name everything the training depends on.

    Example usage::

        model, _ = cached_float_model(fxquant.models.resnet20, "resnet20_fp_20000x3_seed0", train, epochs=3)
    """
    path = Path(cache) / f"{key}.pt"
    torch.manual_seed(seed)
    model = build()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, 0.0
    start = time.perf_counter()
    training = (config or FLOAT_TRAINING).override(epochs=epochs)
    fit(model, train_data, None, training, description=description, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, time.perf_counter() - start
