"""Reference networks for 28×28 grayscale images, the benchmark networks of every fxquant method:

* :func:`resnet20` — CIFAR-style ResNet-20 (He et al. 2016): 3 stages of 3 basic blocks, widths 16/32/64.
* :func:`vit_tiny` — a small Vision Transformer (torchvision's, 7×7 patches, 4 layers of width 64).
* :func:`mobilenet_v2_small` — a MobileNetV2-style net (Sandler et al. 2018): inverted residual blocks with
  depthwise convolutions and linear bottlenecks, the architecture that is notoriously hard to quantize
  (depthwise weights have few elements per channel and wide ranges).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from fxquant.errors import closest


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = None
        if stride != 1 or cin != cout:  # option B: projection shortcut
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        layers, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks = [BasicBlock(cin, width, 1 if i == 0 else 2)] + [BasicBlock(width, width, 1) for _ in range(2)]
            layers.append(nn.Sequential(*blocks))
            cin = width
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10, in_channels: int = 1) -> ResNet20:
    """ResNet-20 for (in_channels, 28, 28) inputs.

    Example usage::

        model = fxquant.models.resnet20()
        logits = model(torch.randn(8, 1, 28, 28))
    """
    return ResNet20(num_classes, in_channels)


class InvertedResidual(nn.Module):
    """Expand 1×1 → depthwise 3×3 → project 1×1 (linear bottleneck), residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


# (expansion t, output channels c, repeats n, first stride s), MobileNetV2's table scaled to 28×28 inputs:
# 28 → 28 → 14 → 7 → 4 spatially.
MOBILENET_V2_SMALL_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1))


class MobileNetV2Small(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, last_channels: int = 256):
        super().__init__()

        def scaled(c: int) -> int:
            return max(8, round(c * width / 8) * 8)

        stem = scaled(16)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6())
        blocks, cin = [], stem
        for t, c, n, s in MOBILENET_V2_SMALL_STAGES:
            for i in range(n):
                blocks.append(InvertedResidual(cin, scaled(c), s if i == 0 else 1, t))
                cin = scaled(c)
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(cin, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels), nn.ReLU6()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(last_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


def mobilenet_v2_small(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> MobileNetV2Small:
    """A MobileNetV2-style net for (in_channels, 28, 28) inputs (about 0.25 M parameters at width 1).

    Example usage::

        model = fxquant.models.mobilenet_v2_small()
        logits = model(torch.randn(8, 1, 28, 28))
    """
    return MobileNetV2Small(num_classes, in_channels, width)


def vit_tiny(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A small Vision Transformer for 28×28 images: 7×7 patches (16 tokens and a class token), 4 encoder
    layers of width 64 with 4 heads — torchvision's ``VisionTransformer``, so its attention is
    ``nn.MultiheadAttention``, what fxquant must quantize to ship transformers.

    Example usage::

        model = fxquant.models.vit_tiny()
        logits = model(torch.randn(8, 1, 28, 28))
    """
    model = VisionTransformer(
        image_size=28, patch_size=7, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=num_classes
    )
    model.conv_proj = nn.Conv2d(in_channels, 64, kernel_size=7, stride=7)
    return model


MODELS = {"resnet20": resnet20, "mobilenet_v2_small": mobilenet_v2_small, "vit_tiny": vit_tiny}


def build(name: str, num_classes: int | None = None, in_channels: int = 1) -> nn.Module:
    """A reference network by name (``resnet20`` or ``fxquant:resnet20``; 10 classes unless told), or any
    torchvision classification model as ``torchvision:NAME`` (random weights, nothing downloaded; its own
    class count unless told).

    Example usage::

        fxquant.models.build("mobilenet_v2_small")
        fxquant.models.build("torchvision:resnet18", num_classes=10)
    """
    if name.startswith("torchvision:"):
        tv_name = name.split(":", 1)[1]
        kwargs: dict = {"weights": None}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if tv_name.startswith(("inception", "googlenet")):
            kwargs["init_weights"] = False
        try:
            return torchvision.models.get_model(tv_name, **kwargs)
        except ValueError as err:
            raise ValueError(f"unknown torchvision model {tv_name!r}: {err}") from None
    name = name.removeprefix("fxquant:")
    if name not in MODELS:
        hint = closest(name, MODELS)
        raise ValueError(
            f"unknown model {name!r}"
            + (f"; did you mean {hint!r}?" if hint else "")
            + f" (built in: {', '.join(MODELS)}, or torchvision:NAME)"
        )
    return MODELS[name](num_classes=num_classes or 10, in_channels=in_channels)
