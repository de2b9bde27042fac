"""Numbers and layout rules every fake-quant kernel shares: the smallest step applied, and how a tensor is seen as
rows of one step each.

Example usage::

    rows_are_blocks(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))   # True
"""

from __future__ import annotations

import torch

MIN_STEP = 1e-8  # the smallest step applied (a learned step can be pushed to or through zero)
# the same, as the float32 kernels see it
MIN_STEP_F32 = float(torch.tensor(MIN_STEP, dtype=torch.float32, device="cpu"))
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def rows_are_blocks(x: torch.Tensor) -> bool:
    """Whether each row of ``x`` along dim 0 is one block of its storage: dense in a format whose outermost
    dimension is dim 0 (contiguous, or channels-last). A kernel can then run over the storage as flat rows.

    Example usage::

        rows_are_blocks(torch.randn(4, 6).t())   # False: dim 0 is not outermost
    """
    if x.is_contiguous():
        return True
    layout = _CHANNELS_LAST.get(x.dim())
    return layout is not None and x.is_contiguous(memory_format=layout)


def in_layout_of(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (x's shape) with the strides of ``torch.empty_like(x)``, the layout fxquant's ops promise for their
    outputs: ``t`` itself when it has them (no allocation when x is dense and t has its strides), else a copy.

    Example usage::

        y = in_layout_of(y_contiguous, x_channels_last)
    """
    if t.stride() == x.stride():
        return t
    out = torch.empty_like(x, dtype=t.dtype)
    return t if out.stride() == t.stride() else out.copy_(t)
