"""Attention written out so that torch.fx can trace it, and fxquant can quantize its products.

``nn.MultiheadAttention`` runs one fused C++ function, and Hugging Face attention dispatches through code a
symbolic tracer cannot follow, so their q·kᵀ and attn·v products were never quantized. The modules here compute
the same thing with ``F.linear``, ``torch.matmul`` and ``softmax`` in plain sight, so the ordinary passes put an
activation quantizer on both operands of each product and a weight quantizer on each projection:

* :class:`QuantizableMultiheadAttention` — an ``nn.MultiheadAttention`` (same parameters, same ``state_dict``
  keys, still an instance of it) whose forward is traceable;
* :class:`AttentionCore` — softmax(q·kᵀ·scale + bias)·v for code that stays opaque (Hugging Face attention
  modules call it as a child, and the child is traced on its own).

Shape-dependent glue (masks in every accepted form) runs in functions wrapped with ``torch.fx.wrap``: they stay
one call in the graph and compute as written. With every quantizer off, outputs equal the original module's to
float rounding (the same ops; the fused kernel may order its sums differently).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layers import rebuilt_as


class TraceableAttention:
    """Marker of an attention module that fxquant rewrote into a traceable form (the report names them)."""

    replaces: str = ""  # the class it stands in for


@fx.wrap
def attention_bias(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """``attn_mask`` and ``key_padding_mask`` (bool: True = masked out, or additive float) merged into one
    additive float tensor that broadcasts against the scores (batch, heads, target, source)."""
    batch, target, source = query.shape[0], query.shape[1], key.shape[1]
    bias = torch.zeros((), dtype=query.dtype, device=query.device)
    if attn_mask is not None:
        mask = _additive(attn_mask, query.dtype)
        if mask.dim() == 3:  # (batch·heads, target, source)
            mask = mask.reshape(batch, num_heads, target, source)
        bias = bias + mask
    if key_padding_mask is not None:
        bias = bias + _additive(key_padding_mask, query.dtype).reshape(batch, 1, 1, source)
    return bias


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


@fx.wrap
def batch_first(x: torch.Tensor, is_batch_first: bool) -> torch.Tensor:
    """(batch, sequence, features) from either layout (unbatched input gets a batch of one)."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x if is_batch_first else x.transpose(0, 1)


@fx.wrap
def restore_layout(x: torch.Tensor, like: torch.Tensor, is_batch_first: bool) -> torch.Tensor:
    """The inverse of :func:`batch_first` for an output computed from ``like``."""
    if like.dim() == 2:
        return x.squeeze(0)
    return x if is_batch_first else x.transpose(0, 1)


@fx.wrap
def attention_weights_out(probs: torch.Tensor, like: torch.Tensor, average: bool) -> torch.Tensor:
    """The weights ``nn.MultiheadAttention`` returns: averaged over heads unless asked not to."""
    weights = probs.mean(dim=1) if average else probs
    return weights.squeeze(0) if like.dim() == 2 else weights


class QuantizableMultiheadAttention(TraceableAttention, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with a forward torch.fx can trace: in-projections, q·kᵀ, softmax, attn·v
    and the out-projection are separate ops. Built from an existing module by :meth:`from_float`, which keeps
    its parameters (``in_proj_weight``, ``out_proj.weight``, ...) so that ``state_dict`` is unchanged.

    Not supported (the module is then left as it is, and reported float): ``add_bias_kv`` and
    ``add_zero_attn``.

    Example usage::

        mha = QuantizableMultiheadAttention.from_float(nn.MultiheadAttention(64, 4, batch_first=True))
        out, _ = mha(x, x, x, need_weights=False)
    """

    replaces = "MultiheadAttention"

    @staticmethod
    def unsupported(module: nn.MultiheadAttention) -> str | None:
        if module.bias_k is not None or module.bias_v is not None:
            return "add_bias_kv is not supported by fxquant's traceable MultiheadAttention"
        if module.add_zero_attn:
            return "add_zero_attn is not supported by fxquant's traceable MultiheadAttention"
        return None

    @classmethod
    def from_float(cls, module: nn.MultiheadAttention) -> QuantizableMultiheadAttention:
        """A traceable module sharing ``module``'s parameters and buffers (``module`` is left as it was)."""
        problem = cls.unsupported(module)
        if problem:
            raise TypeError(problem)
        swapped = rebuilt_as(module, cls)
        # A dropout module, not F.dropout(training=self.training): a traced graph reads the mode at run time.
        swapped.attention_dropout = nn.Dropout(module.dropout)
        return swapped

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._qkv_same_embed_dim:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
            return (
                F.linear(query, self.q_proj_weight, b_q),
                F.linear(key, self.k_proj_weight, b_k),
                F.linear(value, self.v_proj_weight, b_v),
            )
        if query is key and key is value:  # self-attention: one packed projection, as torch computes it
            packed = F.linear(query, self.in_proj_weight, self.in_proj_bias)
            q, k, v = packed.chunk(3, dim=-1)
            return q, k, v
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")  # as nn.MultiheadAttention
        self_attention = query is key and key is value
        q_in = batch_first(query, self.batch_first)
        k_in = q_in if self_attention else batch_first(key, self.batch_first)
        v_in = q_in if self_attention else batch_first(value, self.batch_first)
        q, k, v = self._project(q_in, k_in, v_in)
        heads, head_dim = self.num_heads, self.head_dim
        q = q.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (batch, heads, target, head_dim)
        k = k.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        q = q * math.sqrt(1.0 / float(head_dim))
        scores = torch.matmul(q, k.transpose(-2, -1))
        if attn_mask is not None or key_padding_mask is not None:
            scores = scores + attention_bias(attn_mask, key_padding_mask, q_in, k_in, heads)
        probs = self.attention_dropout(F.softmax(scores, dim=-1))
        out = torch.matmul(probs, v).transpose(1, 2).flatten(-2)  # (batch, target, embed)
        out = restore_layout(self.out_proj(out), query, self.batch_first)
        if not need_weights:
            return out, None
        return out, attention_weights_out(probs, query, average_attn_weights)


class AttentionCore(nn.Module):
    """softmax(q·kᵀ·scale + bias)·v with grouped key/value heads, returning (output, probabilities).

    ``query`` is (batch, heads, target, dim); ``key``/``value`` have ``heads / kv_groups`` heads (grouped-query
    attention repeats them). ``bias`` is an additive mask (and position bias), or a zero scalar for none — a
    tensor always, so that one traced graph serves every call. The output is (batch, target, heads, dim), the
    layout Hugging Face attention functions return.

    Example usage::

        core = AttentionCore(scaling=0.125, dropout=0.1)
        out, probs = core(q, k, v, torch.zeros(()))
    """

    def __init__(self, scaling: float | None = None, dropout: float = 0.0, kv_groups: int = 1):
        super().__init__()
        self.scaling = scaling  # None: 1/sqrt(head dim)
        self.kv_groups = kv_groups
        self.dropout = nn.Dropout(dropout)

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        if self.kv_groups == 1:
            return x
        return x.repeat_interleave(self.kv_groups, dim=1)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scaling = self.scaling if self.scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query, self._repeat(key).transpose(-2, -1)) * scaling
        scores = scores + bias
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        probs = self.dropout(probs)
        out = torch.matmul(probs, self._repeat(value))
        return out.transpose(1, 2).contiguous(), probs


# -- the pieces passes.decompose_attention writes a fused F.scaled_dot_product_attention call with ------------------
def sdpa_scale(query: torch.Tensor, scale: float | None) -> float:
    """The factor scaled_dot_product_attention multiplies scores by: ``scale``, else 1/sqrt(head dim)."""
    return scale if scale is not None else 1.0 / math.sqrt(query.size(-1))


def add_sdpa_mask(scores: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """scores + the mask as scaled_dot_product_attention reads it: bool True = may attend, float = added."""
    if attn_mask.dtype == torch.bool:
        return scores.masked_fill(attn_mask.logical_not(), float("-inf"))
    return scores + attn_mask


def add_causal_mask(scores: torch.Tensor) -> torch.Tensor:
    """Mask out the future (is_causal=True): target i attends to sources ≤ i (top-left aligned, as SDPA)."""
    target, source = scores.shape[-2], scores.shape[-1]
    allowed = torch.ones(target, source, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(allowed.logical_not(), float("-inf"))


def repeat_kv_heads(kv: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention (enable_gqa=True): repeat key/value heads to the query's head count."""
    groups = query.size(-3) // kv.size(-3)
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=-3)
