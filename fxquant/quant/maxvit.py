"""torchvision's MaxViT attention in a form torch.fx can trace, so its two einsum products are quantized.

``RelativePositionalMultiHeadAttention.forward`` starts with ``B, G, P, D = x.shape`` — unpacking a traced
shape fails, so the module ran as written and only its two linear layers were quantized (on their own). This
subclass computes the same ops in the same order with the sizes read one by one.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

from .attention import TraceableAttention
from .layers import rebuilt_as


class QuantizableRelativePositionalMultiHeadAttention(TraceableAttention, RelativePositionalMultiHeadAttention):
    """MaxViT's block/grid attention, traceable; built with :meth:`from_float` (parameters shared).

    Example usage::

        attn = QuantizableRelativePositionalMultiHeadAttention.from_float(block.attn_layer[1])
    """

    replaces = "RelativePositionalMultiHeadAttention"

    @classmethod
    def from_float(cls, module: RelativePositionalMultiHeadAttention) -> nn.Module:
        return rebuilt_as(module, cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, groups, tokens, features = x.size(0), x.size(1), x.size(2), x.size(3)
        heads, head_dim = self.n_heads, self.head_dim
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(batch, groups, tokens, heads, head_dim).permute(0, 1, 3, 2, 4)
        k = k.reshape(batch, groups, tokens, heads, head_dim).permute(0, 1, 3, 2, 4)
        v = v.reshape(batch, groups, tokens, heads, head_dim).permute(0, 1, 3, 2, 4)
        k = k * self.scale_factor
        dot_prod = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
        dot_prod = torch.softmax(dot_prod + self.get_relative_positional_bias(), dim=-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", dot_prod, v)
        out = out.permute(0, 1, 3, 2, 4).reshape(batch, groups, tokens, features)
        return self.merge(out)


TRACEABLE_MAXVIT = {RelativePositionalMultiHeadAttention: QuantizableRelativePositionalMultiHeadAttention}
