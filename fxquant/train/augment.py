"""Train-time augmentation of 28×28-style images: random shifts and flips (``standard``), plus a random
erased square (``strong``). Draws from torch's default generator unless one is given, so a seeded run does not
depend on what ran before it in the process.
"""

from __future__ import annotations

import torch

AUGMENTS = ("none", "standard", "strong")


def augment_image(image: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """One augmented copy of a (C, H, W) image (see FashionMNIST for the kinds)."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2), value=float(image.min()))
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=generator, device="cpu"))
    out = padded[:, dy : dy + h, dx : dx + w]
    if torch.rand((), generator=generator, device="cpu") < 0.5:
        out = out.flip(-1)
    if kind == "strong":
        size = int(torch.randint(6, 13, (), generator=generator, device="cpu"))
        y, x = (int(v) for v in torch.randint(0, h - size, (2,), generator=generator, device="cpu"))
        out = out.clone()
        out[:, y : y + size, x : x + size] = 0.0
    return out


def augment_batch(x: torch.Tensor, kind: str = "strong", generator: torch.Generator | None = None) -> torch.Tensor:
    """An independently augmented copy of every image of a (N, C, H, W) batch, as :func:`augment_image` makes them
    (the same distribution), computed on the batch's device in a few batched ops: the random numbers are drawn on
    the CPU (from ``generator``) and nothing is read back from the device.

    Example usage::

        second_view = augment_batch(x, "strong")
    """
    if kind not in AUGMENTS or kind == "none":
        raise ValueError(f"batch augmentation must be 'standard' or 'strong', got {kind!r}")
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W) images, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    # drawn on the host, where the generator is
    shift = torch.randint(0, 5, (n, 2), generator=generator, device="cpu")
    flip = torch.rand(n, generator=generator, device="cpu") < 0.5
    size = torch.randint(6, 13, (n,), generator=generator, device="cpu")
    room = torch.tensor([h, w], device="cpu") - size[:, None]
    corner = (torch.rand(n, 2, generator=generator, device="cpu") * room).long()
    shift, flip, size, corner = (t.to(x.device, non_blocking=True) for t in (shift, flip, size, corner))
    # shifted by up to 2 pixels each way, the border filled with each image's minimum
    rows = torch.arange(h, device=x.device) + shift[:, :1] - 2  # (n, h): source row of each output row
    cols = torch.arange(w, device=x.device) + shift[:, 1:] - 2
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (n, h, w)
    gathered = x[torch.arange(n, device=x.device)[:, None, None], :, rows.clamp(0, h - 1)[:, :, None],
                 cols.clamp(0, w - 1)[:, None, :]].permute(0, 3, 1, 2)  # fmt: skip
    out = torch.where(inside[:, None], gathered, x.amin(dim=(1, 2, 3), keepdim=True))
    if kind == "strong":  # a square of 6 to 12 pixels erased to 0
        ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        in_rows = (ys >= corner[:, :1]) & (ys < corner[:, :1] + size[:, None])
        in_cols = (xs >= corner[:, 1:]) & (xs < corner[:, 1:] + size[:, None])
        out = out.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)
    return out
