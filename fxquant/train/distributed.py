"""Data-parallel training support: who am I, which samples are mine, and identical quantizer initialisation.

Nothing here is decided at import time: :func:`setup` reads the environment ``torchrun`` sets
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) when ``fit`` calls it, and joins the
process group (gloo on CPU; with CUDA, nccl, after making ``cuda:LOCAL_RANK`` this rank's device) unless the
caller already did. Every reduction runs on the backend's device: a CPU tensor handed to an nccl group is reduced
through a copy on the rank's GPU.

Quantizer steps are learned from the first batch. Under data parallelism each rank sees a different batch,
so :func:`initialize_quantizers` reduces the statistics the steps are computed from across ranks (sums for
LSQ's mean |x|, min/max for LSQ+ and observers, "any negative" for the sign): every rank starts from the same
steps, and they equal what a single process would compute from the whole global batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fxquant.quant.quantizers import FakeQuantizer

from .devices import model_device, to_device


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: a world of one for an ordinary single-process run. ``joined`` is True
    in a process group (under torchrun, also with one rank: then the data-parallel path runs on one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    joined: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.joined


def setup(mode: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``mode="auto"``; also with ``--nproc_per_node 1``), or
    stay single-process (``mode="off"``, or no torchrun). Returns this process's rank and the world size.

    Example usage::

        info = fxquant.train.distributed.setup()    # under torchrun --nproc_per_node 2: rank 0 or 1 of 2
    """
    if mode not in ("auto", "off"):
        raise ValueError(f"distributed mode must be 'auto' or 'off', got {mode!r}")
    if not torch.distributed.is_available():
        return DistInfo()
    if not torch.distributed.is_initialized():
        if mode == "off" or "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
            return DistInfo()  # not launched by torchrun
        backend = "gloo"
        if torch.cuda.is_available():
            backend = "nccl"
            torch.cuda.set_device(_local_rank() % torch.cuda.device_count())  # one device per rank
        torch.distributed.init_process_group(backend=backend)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), _local_rank(), True)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``min``, ``max``) when a process group is up; otherwise unchanged. Under nccl
    a CPU tensor is reduced through a copy on this rank's GPU (nccl reduces GPU tensors only).

    Example usage::

        all_reduce(torch.tensor([correct, total], device=device))
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN}.get(
        op, torch.distributed.ReduceOp.MAX
    )
    if torch.distributed.get_backend() == "nccl" and t.device.type != "cuda":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(on_gpu, op=reduce_op)
        return t.copy_(on_gpu)
    torch.distributed.all_reduce(t, op=reduce_op)
    return t


@contextmanager
def _synchronised(quantizers: list[FakeQuantizer]) -> Iterator[None]:
    for q in quantizers:
        q.reduce_statistics = all_reduce
    try:
        yield
    finally:
        for q in quantizers:
            q.reduce_statistics = None


@torch.no_grad()
def initialize_quantizers(model: nn.Module, *args: torch.Tensor) -> int:
    """Initialise every not-yet-initialised quantizer from one forward on ``args`` (moved to the model's device;
    training mode, no gradient, batch-norm running statistics left as they were), with statistics reduced across
    ranks when a process group is up. Returns how many quantizers were initialised. Every rank must call it.

    Example usage::

        x, _ = next(iter(train_loader))
        fxquant.train.distributed.initialize_quantizers(qmodel, x)
    """
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer) and not m.is_initialized]
    if not quantizers:
        return 0
    _quantizer_forward(model, quantizers, args)
    return sum(q.is_initialized for q in quantizers)


@torch.no_grad()
def observe(model: nn.Module, *args: torch.Tensor) -> None:
    """One more calibration forward for the observer quantizers (ranges reduced across ranks), leaving the
    model's other buffers (batch-norm statistics) as they were.

    Example usage::

        fxquant.train.distributed.observe(qmodel, x)
    """
    _quantizer_forward(model, [m for m in model.modules() if isinstance(m, FakeQuantizer)], args)


def _quantizer_forward(model: nn.Module, quantizers: list[FakeQuantizer], args: tuple[torch.Tensor, ...]) -> None:
    """A training-mode forward (on the model's device) whose only lasting effect is on ``quantizers``' state."""
    args = to_device(args, model_device(model))
    quantizer_buffers = {id(b) for q in quantizers for b in q.buffers()}
    saved = [(b, b.clone()) for b in model.buffers() if id(b) not in quantizer_buffers]
    was_training = model.training
    model.train()
    try:
        with _synchronised(quantizers):
            model(*args)
    finally:
        model.train(was_training)
        for buffer, value in saved:
            buffer.copy_(value)
