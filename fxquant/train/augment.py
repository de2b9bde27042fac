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
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=generator))
    out = padded[:, dy : dy + h, dx : dx + w]
    if torch.rand((), generator=generator) < 0.5:
        out = out.flip(-1)
    if kind == "strong":
        size = int(torch.randint(6, 13, (), generator=generator))
        y, x = (int(v) for v in torch.randint(0, h - size, (2,), generator=generator))
        out = out.clone()
        out[:, y : y + size, x : x + size] = 0.0
    return out


def augment_batch(x: torch.Tensor, kind: str = "strong", generator: torch.Generator | None = None) -> torch.Tensor:
    """An independently augmented copy of every image of a (N, C, H, W) batch (see :func:`augment_image`).

    Example usage::

        second_view = augment_batch(x, "strong")
    """
    if kind not in AUGMENTS or kind == "none":
        raise ValueError(f"batch augmentation must be 'standard' or 'strong', got {kind!r}")
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W) images, got shape {tuple(x.shape)}")
    return torch.stack([augment_image(image, kind, generator) for image in x])
