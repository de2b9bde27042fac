"""What several commands share: argument types, model specs, shapes, float checkpoints, input channels."""

from __future__ import annotations

import argparse

from torch import nn

from fxquant.checkpoint import CheckpointError, safe_load
from fxquant.config.sections import device_problem
from fxquant.models import build
from fxquant.quant.spec import bits_problem


# -- argument types: a bad value is argparse's one-line usage error, never a traceback later ---------------------
def positive_int(text: str) -> int:
    """An integer > 0 (epochs, images, iterations, batch sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def shape(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` → (1, 3, 224, 224): two to five positive integers."""
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,224,224, got {text!r}") from None
    if not 2 <= len(dims) <= 5 or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"expected 2 to 5 positive sizes like 1,3,224,224, got {text!r}")
    return dims


def widths(text: str) -> list[int]:
    """``2,3,4,8`` → [2, 3, 4, 8]: distinct valid bit widths, ascending."""
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit widths like 2,3,4,8, got {text!r}") from None
    for value in values:
        problem = bits_problem(value, "each width")
        if problem:
            raise argparse.ArgumentTypeError(problem)
    return values


def device_spec(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists here is checked when the command runs)."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` of every command that runs a model."""
    parser.add_argument(
        "--device", type=device_spec, default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N"
    )


def model_from_spec(spec: str) -> nn.Module:
    """``torchvision:NAME``, ``resnet20``/``mobilenet_v2_small`` (also with an ``fxquant:`` prefix)."""
    return build(spec)


def load_float_state(model: nn.Module, path: str, option: str) -> None:
    """Load a float state_dict; anything else (an fxquant checkpoint, another architecture's weights, a refused
    or unreadable file) is a one-line error naming the option and the file."""
    try:
        state = safe_load(path)
    except CheckpointError as err:
        raise CheckpointError(f"{option} {err}") from None
    if isinstance(state, dict) and "format" in state:
        raise ValueError(f"{option} {path} is an fxquant checkpoint; {option} takes a float state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{option} {path}: not a state_dict (holds a {type(state).__name__})")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [str(k) for k in state if k not in own]
    misshapen = [k for k in own if k in state and getattr(state[k], "shape", None) != own[k].shape]
    problems = [
        f"{len(found)} {what} ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
        for what, found in (("missing", missing), ("unexpected", unexpected), ("of another shape", misshapen))
        if found
    ]
    if problems:
        raise ValueError(f"{option} {path}: does not fit this model: keys {'; '.join(problems)}")
    model.load_state_dict(state)


def input_channels(model: nn.Module) -> int:
    """The channels the model's first convolution takes (1 when it has none)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 1
