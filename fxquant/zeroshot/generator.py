"""The generator of synthetic images: GDFQ-family, with LRQ's large-kernel "long-range attention" blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def dilated_depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """Depthwise k×k convolution with dilation d and "same" zero padding, computed as an undilated k×k
    convolution on each of the d² phase sub-images (x[r::d, s::d]) folded into the batch.

    Exactly ``F.conv2d(x, weight, bias, padding=d·(k−1)/2, dilation=d, groups=C)`` (tested), but faster on CPU,
    where torch's dilated depthwise convolution takes a slower path (measured once on a 64×64×28×28 batch, 7×7
    dilation 3, one thread: this took about 60% of the time; no results file keeps it).
    """
    n, c, h, w = x.shape
    k = weight.shape[-1]
    hp, wp = -(-h // dilation) * dilation, -(-w // dilation) * dilation
    x = F.pad(x, (0, wp - w, 0, hp - h))
    phases = x.view(n, c, hp // dilation, dilation, wp // dilation, dilation).permute(0, 3, 5, 1, 2, 4)
    phases = phases.reshape(n * dilation * dilation, c, hp // dilation, wp // dilation)
    out = F.conv2d(phases, weight, bias, padding=(k - 1) // 2, groups=c)
    out = out.view(n, dilation, dilation, c, hp // dilation, wp // dilation).permute(0, 3, 4, 1, 5, 2)
    return out.reshape(n, c, hp, wp)[:, :, :h, :w]


class LongRangeAttention(nn.Module):
    """Large-kernel attention: depthwise 5×5 → depthwise 7×7 dilated 3 → 1×1, multiplied with the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.local = nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.wide = nn.Conv2d(channels, channels, 7, padding=9, dilation=3, groups=channels)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = dilated_depthwise(self.local(x), self.wide.weight, self.wide.bias, self.wide.dilation[0])
        return x * self.mix(wide)


class Generator(nn.Module):
    """Images (N, C, H, W) from latent codes and labels; see the module docstring.

    Example usage::

        g = Generator(num_classes=10, image_shape=(1, 28, 28))
        x = g(torch.randn(8, 100), torch.arange(8))        # (8, 1, 28, 28), about zero mean, unit variance
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: tuple[int, int, int],
        latent_dim: int = 100,
        channels: int = 64,
        long_range: bool = True,
    ):
        super().__init__()
        c, h, w = image_shape
        self.image_shape = image_shape
        self.latent_dim = latent_dim
        self.init_hw = (max(1, math.ceil(h / 4)), max(1, math.ceil(w / 4)))
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.project = nn.Linear(latent_dim, 2 * channels * self.init_hw[0] * self.init_hw[1])
        self.bn0 = nn.BatchNorm2d(2 * channels)

        def stage(cin: int, cout: int) -> nn.Sequential:
            layers = [nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)]
            layers.append(nn.LeakyReLU(0.2))
            if long_range:
                layers.append(LongRangeAttention(cout))
            return nn.Sequential(*layers)

        self.up1 = stage(2 * channels, 2 * channels)
        self.up2 = stage(2 * channels, channels)
        self.to_image = nn.Sequential(nn.Conv2d(channels, c, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(c, affine=False))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.project(self.embed(y) * z).view(len(z), -1, *self.init_hw)
        x = self.to_image(self.up2(self.up1(self.bn0(x))))
        if tuple(x.shape[-2:]) != self.image_shape[1:]:
            x = F.interpolate(x, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return x

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, y): latent codes and uniformly drawn labels, on the generator's device (drawn where ``generator``
        lives, when one is given)."""
        device = self.embed.weight.device
        source = generator.device if generator is not None else device
        z = torch.randn(n, self.latent_dim, generator=generator, device=source)
        y = torch.randint(0, self.embed.num_embeddings, (n,), generator=generator, device=source)
        return z.to(device), y.to(device)
