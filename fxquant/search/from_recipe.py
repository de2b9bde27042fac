"""A recipe's ``[search]``, run by ``fxquant.fit`` before training: per-layer widths from sensitivity on a few
plain (unaugmented) batches, applied to the model and recorded as ``qmodel.bit_plan`` (which a checkpoint keeps,
so a resumed run does not search again).
"""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from torch.utils.data import DataLoader

from fxquant.qat_model import QATModel
from fxquant.train.coreset import plain_view
from fxquant.train.distributed import initialize_quantizers

from .budget import parse_budget
from .plan import apply
from .report import report
from .run import search


def _warmup_batches(train_data: Any, batch_size: int, count: int) -> list:
    """``count`` shuffled training batches (seeded, with the data's own augmentation) for the supernet warm-up."""
    shuffled = torch.Generator().manual_seed(1)
    loader = DataLoader(train_data, batch_size=batch_size, shuffle=True, generator=shuffled, drop_last=True)
    batches: list = []
    while len(batches) < count:
        for batch in loader:
            batches.append((batch[0], batch[-1]))
            if len(batches) == count:
                break
    return batches


def search_for_recipe(qmodel: QATModel, train_data: Any, batch_size: int, progress: bool = True) -> dict:
    """Run ``qmodel.recipe.search`` on ``train_data`` and apply the plan; returns it.

    Example usage::

        plan = search_for_recipe(fxquant.prepare_qat(model, "mixed_hessian"), train_data, 128)
    """
    config = qmodel.recipe.search
    if config is None:
        raise ValueError(f"recipe {qmodel.recipe.name!r} has no [search] table")
    initialize_quantizers(qmodel, next(iter(DataLoader(train_data, batch_size=batch_size)))[0])
    # shuffled (seeded): the first batches of a dataset stored in class order would calibrate on a few classes
    shuffled = torch.Generator().manual_seed(0)
    loader = DataLoader(plain_view(train_data), batch_size=batch_size, shuffle=True, generator=shuffled)
    batches = [(batch[0], batch[-1]) for _, batch in zip(range(config.batches), loader)]  # search() moves them
    warmup = _warmup_batches(train_data, batch_size, config.warmup_iterations) if config.method == "saq" else ()
    plan, layers = search(
        qmodel, batches, config, example_inputs=batches[0][0][:1], progress=progress, warmup_batches=warmup
    )
    apply(qmodel, plan)
    # Steps are initialised at the planned widths on the first training batch (as a uniform recipe's are), not
    # rescaled from the recipe's default width: at 2 bits the two differ a lot.
    for q in qmodel.quantizers().values():
        q.mark_initialized(False)
    if progress:
        report(layers, parse_budget(config.budget, layers), plan, config.method, Console())
    return plan
