"""torchvision's Swin attention in a form torch.fx can trace, so its projections and products are quantized.

torchvision's ``ShiftedWindowAttention.forward`` hands its weights to one ``torch.fx.wrap``-ed function
(``shifted_window_attention``), so a traced Swin showed neither the qkv/proj layers nor the q·kᵀ and attn·v
products. Here the same computation is split: the window bookkeeping (padding, cyclic shift, partition, the
shifted-window mask, merging back) stays in wrapped functions, whose control flow depends on the feature size;
the projections, products and softmax are ordinary traced ops. With quantizers off the result equals
torchvision's: the same ops in the same order.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from .attention import TraceableAttention
from .layers import rebuilt_as


class WindowLayout(NamedTuple):
    """What :func:`partition_windows` needs to undo itself."""

    batch: int
    height: int
    width: int
    padded_height: int
    padded_width: int
    shift: tuple[int, int]
    windows: int  # per image


@fx.wrap
def partition_windows(
    x: torch.Tensor, window_size: list[int], shift_size: list[int]
) -> tuple[torch.Tensor, WindowLayout]:
    """(B, H, W, C) → (B·windows, tokens per window, C), padded and cyclically shifted as torchvision does."""
    batch, height, width, channels = x.shape
    pad_r = (window_size[1] - width % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - height % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift = [0 if window_size[0] >= pad_h else shift_size[0], 0 if window_size[1] >= pad_w else shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    x = x.view(batch, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * windows, window_size[0] * window_size[1], channels)
    return x, WindowLayout(batch, height, width, pad_h, pad_w, (shift[0], shift[1]), windows)


@fx.wrap
def add_shift_mask(attn: torch.Tensor, layout: WindowLayout, window_size: list[int], num_heads: int) -> torch.Tensor:
    """Mask attention across the seams a cyclic shift creates (−100, as torchvision); unchanged when unshifted."""
    if sum(layout.shift) == 0:
        return attn
    pad_h, pad_w, shift = layout.padded_height, layout.padded_width, layout.shift
    mask = attn.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    mask = mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
    mask = mask.permute(0, 2, 1, 3).reshape(layout.windows, window_size[0] * window_size[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, (-100.0)).masked_fill(mask == 0, 0.0)
    tokens = attn.size(-1)
    attn = attn.view(attn.size(0) // layout.windows, layout.windows, num_heads, tokens, tokens)
    attn = attn + mask.unsqueeze(1).unsqueeze(0)
    return attn.view(-1, num_heads, tokens, tokens)


@fx.wrap
def merge_windows(x: torch.Tensor, layout: WindowLayout, window_size: list[int]) -> torch.Tensor:
    """The inverse of :func:`partition_windows`: (B·windows, tokens, C) → (B, H, W, C)."""
    channels = x.shape[-1]
    pad_h, pad_w = layout.padded_height, layout.padded_width
    x = x.view(layout.batch, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(layout.batch, pad_h, pad_w, channels)
    if sum(layout.shift) > 0:
        x = torch.roll(x, shifts=layout.shift, dims=(1, 2))
    return x[:, : layout.height, : layout.width, :].contiguous()


@fx.wrap
def key_bias_zeroed(bias: torch.Tensor) -> torch.Tensor:
    """Swin V2 adds no bias to the keys: the middle third of the qkv bias is zeroed on every call."""
    bias = bias.clone()
    length = bias.numel() // 3
    bias[length : 2 * length].zero_()
    return bias


class _TraceableWindowAttention(TraceableAttention):
    """Shared forward of the traceable Swin attention modules (V1 scaled dot product, V2 cosine)."""

    cosine = False

    @classmethod
    def from_float(cls, module: ShiftedWindowAttention) -> nn.Module:
        swapped = rebuilt_as(module, cls)
        # modules, not F.dropout(training=self.training): a traced graph reads the mode at run time
        swapped.attn_drop = nn.Dropout(module.attention_dropout)
        swapped.proj_drop = nn.Dropout(module.dropout)
        return swapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relative_position_bias = self.get_relative_position_bias()
        windows, layout = partition_windows(x, self.window_size, self.shift_size)
        channels, heads = self.qkv.in_features, self.num_heads
        if self.cosine and self.qkv.bias is not None:
            qkv = F.linear(windows, self.qkv.weight, key_bias_zeroed(self.qkv.bias))
        else:
            qkv = self.qkv(windows)
        n_windows, tokens = windows.size(0), windows.size(1)
        qkv = qkv.reshape(n_windows, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.cosine:
            attn = torch.matmul(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(-2, -1))
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            q = q * (channels // heads) ** -0.5
            attn = torch.matmul(q, k.transpose(-2, -1))
        attn = attn + relative_position_bias
        attn = add_shift_mask(attn, layout, self.window_size, heads)
        attn = self.attn_drop(F.softmax(attn, dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).reshape(n_windows, tokens, channels)
        out = self.proj_drop(self.proj(out))
        return merge_windows(out, layout, self.window_size)


class QuantizableShiftedWindowAttention(_TraceableWindowAttention, ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` (Swin V1), traceable; built with :meth:`from_float`.

    Example usage::

        attn = QuantizableShiftedWindowAttention.from_float(model.features[1][0].attn)
    """

    replaces = "ShiftedWindowAttention"


class QuantizableShiftedWindowAttentionV2(_TraceableWindowAttention, ShiftedWindowAttentionV2):
    """torchvision's ``ShiftedWindowAttentionV2`` (cosine attention, continuous position bias), traceable."""

    replaces = "ShiftedWindowAttentionV2"
    cosine = True


TRACEABLE_SWIN = {
    ShiftedWindowAttention: QuantizableShiftedWindowAttention,
    ShiftedWindowAttentionV2: QuantizableShiftedWindowAttentionV2,
}
