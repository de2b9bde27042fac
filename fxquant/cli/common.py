"""What several commands share: model specs, shapes, float checkpoints, data with the model's channels."""

from __future__ import annotations

import torch
from torch import nn

from fxquant.models import build


def model_from_spec(spec: str) -> nn.Module:
    """``torchvision:NAME``, ``resnet20``/``mobilenet_v2_small`` (also with an ``fxquant:`` prefix)."""
    return build(spec)


def parse_shape(text: str, option: str = "--input") -> tuple[int, ...]:
    """``1,3,224,224`` → (1, 3, 224, 224)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers like 1,3,224,224, got {text!r}") from None


def load_float_state(model: nn.Module, path: str, option: str) -> None:
    """Load a float state_dict; an fxquant checkpoint here is a one-line error, not a key mismatch."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "format" in state:
        raise ValueError(f"{option} {path} is an fxquant checkpoint; {option} takes a float state_dict")
    model.load_state_dict(state)


def input_channels(model: nn.Module) -> int:
    """The channels the model's first convolution takes (1 when it has none)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 1
