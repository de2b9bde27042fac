"""Optimizer groups and the learning-rate schedule of a recipe's ``[train]`` table.

The optimizer treats three kinds of parameters differently (what LSQ training needs): quantizer steps and
offsets get their own learning rate and no weight decay (decay would pull steps toward zero), batch-norm
and bias parameters get no weight decay, all other weights get the recipe's decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxquant.config.sections import TrainConfig
from fxquant.quant.quantizers import FakeQuantizer


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


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer a recipe's ``[train]`` table asks for.

    Example usage::

        optimizer = fxquant.train.make_optimizer(qmodel, qmodel.recipe.train)
    """
    groups = parameter_groups(model, config.lr, config.weight_decay, config.quantizer_lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)


def lr_at(epoch_progress: float, config: TrainConfig) -> float:
    """Learning-rate multiplier at a fractional epoch: linear warm-up, then cosine to zero or constant.

    Example usage::

        lr_at(0.5, TrainConfig(epochs=1))      # 0.5
    """
    epochs, warmup = config.epochs, config.warmup_epochs
    if warmup and epoch_progress < warmup:
        return (epoch_progress + 1e-3) / warmup
    if config.schedule == "constant":
        return 1.0
    span = max(epochs - warmup, 1e-9)
    return 0.5 * (1 + math.cos(math.pi * min((epoch_progress - warmup) / span, 1.0)))
