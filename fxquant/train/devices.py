"""Where a run computes and in which precision: the device a model lives on, moving batches there, the
``[train] device`` and ``precision`` settings, and the autocast context and gradient scaler they call for.

The run follows the model: :func:`model_device` is the one device a model's parameters and buffers are on, and
``fit``, ``evaluate``, ``calibrate`` and ``TrainStep`` move each batch there (:func:`to_device`, without blocking
the host when the model is on a GPU). ``device = "auto"`` keeps a model that already is on an accelerator where it
is, and otherwise puts it on this process's CUDA device (``LOCAL_RANK`` under torchrun) when there is one.

Example usage::

    device = resolve_device("auto", model)           # cuda:0 on a GPU machine, else cpu
    precision = Precision.of("bf16", device)
    with precision.autocast():
        loss = criterion(model(to_device(x, device)), to_device(y, device))
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxquant.config.sections import PRECISIONS
from fxquant.errors import FxQuantError

AUTOCAST_DTYPES = dict(zip(PRECISIONS, (None, torch.bfloat16, torch.float16), strict=True))


class DeviceError(FxQuantError):
    """A device or precision that cannot be used, or a model or batch on the wrong device."""


def model_device(model: nn.Module) -> torch.device:
    """The device every parameter and buffer of ``model`` is on (the CPU for a model without any); a model split
    across devices is a :class:`DeviceError` naming two of them.

    Example usage::

        model_device(qmodel.cuda())   # device(type='cuda', index=0)
    """
    found: dict[torch.device, str] = {}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        found.setdefault(tensor.device, name)
        if len(found) > 1:
            (first, first_name), (second, second_name) = list(found.items())[:2]
            raise DeviceError(
                f"{type(model).__name__} is split across devices ({first_name!r} on {first}, {second_name!r} on "
                f"{second}); fxquant trains a model on one device: move all of it with model.to(device)"
            )
    return next(iter(found), torch.device("cpu"))


def resolve_device(spec: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """The device ``spec`` names: ``"auto"`` (or None) is the model's device when that is an accelerator, else
    this process's CUDA device when torch sees one (``cuda:LOCAL_RANK`` under torchrun), else the CPU; ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or any device torch knows must exist here.

    Example usage::

        resolve_device("cuda:1")   # DeviceError on a machine with one GPU
    """
    if spec is None or spec == "auto":
        current = model_device(model) if model is not None else torch.device("cpu")
        if current.type not in ("cpu", "meta"):
            return current
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(
            f"device {spec!r} is not a device torch knows ({err}); use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {spec!r} asked for, but this torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                "use device auto or cpu"
            )
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % count)
        elif device.index >= count:
            raise DeviceError(
                f"device {spec!r} asked for, but this machine has {count} CUDA GPU(s): cuda:0..cuda:{count - 1}"
            )
    return device


def to_device(batch: Any, device: torch.device, non_blocking: bool | None = None) -> Any:
    """``batch`` (a tensor, or tuples, lists and dicts of them) with every tensor on ``device``; tensors already
    there are returned as they are. Copies to a GPU do not block the host (pinned memory makes them asynchronous).

    Example usage::

        x, y = to_device((x, y), torch.device("cuda"))
    """
    if non_blocking is None:
        non_blocking = device.type == "cuda"
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        if batch.device.type == "meta" and device.type != "meta":
            raise DeviceError(f"a batch tensor is on the meta device (no data): it cannot be moved to {device}")
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(item, device, non_blocking) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device, non_blocking) for key, value in batch.items()}
    return batch


def loader_options(device: torch.device) -> dict[str, Any]:
    """DataLoader keyword arguments for feeding ``device``: pinned memory and worker processes for a GPU (so that
    copies overlap compute), none for the CPU.

    Example usage::

        DataLoader(data, batch_size=128, **loader_options(torch.device("cuda")))
    """
    if device.type != "cuda":
        return {}
    workers = min(8, max(1, (os.cpu_count() or 2) // max(torch.cuda.device_count(), 1) // 2))
    return {"pin_memory": True, "num_workers": workers, "persistent_workers": True}


@dataclass(frozen=True)
class Precision:
    """How a run computes: ``name`` (``fp32``, ``bf16`` or ``fp16``) on a device type. bf16 and fp16 run the
    forward under ``torch.autocast``; fp16 also scales the loss (``torch.amp.GradScaler``) so that small gradients,
    the quantizer steps' among them, do not underflow. Steps, offsets and their gradients stay float32 throughout.

    Example usage::

        precision = Precision.of("fp16", torch.device("cuda"))
        scaler = precision.scaler()      # a GradScaler for fp16, None otherwise
    """

    name: str = "fp32"
    device_type: str = "cpu"

    @classmethod
    def of(cls, name: str, device: torch.device) -> Precision:
        """The precision ``name`` on ``device``, refused with a clear error where the device cannot run it."""
        if name not in AUTOCAST_DTYPES:
            raise DeviceError(f"precision must be one of {', '.join(PRECISIONS)}; got {name!r}")
        if name == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            gpu = torch.cuda.get_device_name(device)
            raise DeviceError(
                f"precision bf16 needs a GPU with bfloat16 arithmetic (compute capability 8.0 or newer); {device} is a "
                f"{gpu} ({'.'.join(map(str, torch.cuda.get_device_capability(device)))}): use fp16 or fp32"
            )
        return cls(name, device.type)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for fp32."""
        return AUTOCAST_DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for a forward (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16, else None."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


def autocast_without_scaling(device: torch.device) -> bool:
    """Whether the caller runs under an fp16 autocast on ``device``'s type (set outside fxquant): a training step
    then needs a gradient scaler, which only a step told ``precision="fp16"`` has."""
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
