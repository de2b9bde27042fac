"""Hugging Face ``transformers`` attention, computed where fxquant can quantize it.

Every attention module of ``transformers`` 5 (BERT, GPT-2, ViT, LLaMA, T5, ...) hands its query, key and value
to a function looked up by name in ``AttentionInterface`` (``config._attn_implementation``). fxquant registers
one more, :func:`attention_forward` under :data:`IMPLEMENTATION`, which calls the module's ``fxquant_attention``
child, an :class:`~fxquant.quant.attention.AttentionCore`. The attention module's own forward usually cannot be
traced (caches, shape checks), but the core can: it is traced as a piece of its own and its q·kᵀ and attn·v
products get activation quantizers like any matmul. Its masks are the "eager" implementation's (additive float).

Nothing here imports ``transformers``: the caller passes the interfaces in (see ``passes.swap_modules``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention import AttentionCore

IMPLEMENTATION = "fxquant"
CORE_NAME = "fxquant_attention"


def is_hf_attention(module: nn.Module) -> bool:
    """An attention module of ``transformers`` that dispatches through ``AttentionInterface``."""
    forward = getattr(type(module), "forward", None)
    while hasattr(forward, "__wrapped__"):  # transformers decorates forwards (deprecated kwargs, ...)
        forward = forward.__wrapped__
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names and hasattr(module, "config")


def _dropout_of(module: nn.Module) -> float:
    """The attention-probability dropout a module passes to its attention function in training."""
    for name in ("attn_dropout", "attention_dropout", "dropout_prob", "dropout"):
        value = getattr(module, name, None)
        if isinstance(value, nn.Dropout):
            return float(value.p)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def attach_core(module: nn.Module) -> AttentionCore:
    """Give a Hugging Face attention module the traceable core :func:`attention_forward` calls."""
    core = AttentionCore(
        scaling=getattr(module, "scaling", None),
        dropout=_dropout_of(module),
        kv_groups=int(getattr(module, "num_key_value_groups", 1) or 1),
    )
    module.add_module(CORE_NAME, core)
    return core


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``AttentionInterface`` function fxquant registers: eager attention through ``module.fxquant_attention``
    (scores + position bias + mask, softmax in float32, dropout, ·v), as each model's eager function computes."""
    core = getattr(module, CORE_NAME, None)
    if core is None:
        raise RuntimeError(
            f"{type(module).__name__} has no {CORE_NAME}: the '{IMPLEMENTATION}' attention implementation is set by "
            "fxquant.prepare_qat on the models it prepares; use 'eager' or 'sdpa' elsewhere"
        )
    if scaling is not None and core.scaling is not None and scaling != core.scaling:
        raise RuntimeError(f"{type(module).__name__} asked for scaling {scaling}, its fxquant core has {core.scaling}")
    bias = torch.zeros((), dtype=query.dtype, device=query.device)
    if position_bias is not None:
        bias = bias + position_bias
    if attention_mask is not None:
        bias = bias + attention_mask
    return core(query, key, value, bias)
