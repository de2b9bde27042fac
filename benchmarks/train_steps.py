"""What the step-timing benchmarks (``overhead.py``, ``compiled_backward.py``) share: the models of the speed goal
with their batches and goals, one timed train step, and the calibrated W4A4 twin of a model.

Example usage::

    model, qmodel, x, y = fp_and_w4a4("resnet20")
    step = TimedStep(torch.compile(qmodel), x, y, {})
    seconds = step()
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

import fxquant

# W4A4 step / FP step (eager vs eager, compiled vs compiled), and saved activations / FP's: the CPU goals of the
# GPU-speed issue (the op must not cost the CPU its lead)
CNN_GOAL, LINEAR_GOAL, MEMORY_GOAL = 1.10, 1.5, 1.10


def use_a_fresh_compile_cache() -> None:
    """Point torch.compile's on-disk cache at a new empty folder, removed at exit: compiled variants are built from
    the code as it is now. (Inductor's cache key leaves out a custom op's layout tag, so a cache written by older
    fxquant code can serve a graph that copies every activation to the traced layout before the backward op.)
    Call it before anything is compiled."""
    folder = tempfile.mkdtemp(prefix="fxquant-bench-inductor-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder


class MLP(nn.Module):
    """The 4-layer MLP of the speed goal: 784 → 1024 → 1024 → 1024 → 10 with ReLUs. (A module with its own
    forward, not a bare nn.Sequential: NNCF adds a child to the model it quantizes, which a Sequential would call.)
    """

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass(frozen=True)
class Bench:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    data: str  # "random" or "fashion-mnist"
    goal: float
    has_linear_layers: bool = False  # torchao's QAT rewrites nn.Linear only: measured where most of the work is Linear


MODELS = {
    "resnet18": Bench(
        lambda: torchvision.models.resnet18(weights=None, num_classes=10), (32, 3, 64, 64), "random", CNN_GOAL
    ),
    "mobilenet_v2": Bench(
        lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10), (32, 3, 64, 64), "random", CNN_GOAL
    ),
    "resnet20": Bench(fxquant.models.resnet20, (128, 1, 28, 28), "fashion-mnist", CNN_GOAL),
    "mlp": Bench(MLP, (128, 1, 28, 28), "fashion-mnist", LINEAR_GOAL, has_linear_layers=True),
    "vit_tiny": Bench(fxquant.models.vit_tiny, (128, 1, 28, 28), "fashion-mnist", LINEAR_GOAL, has_linear_layers=True),
}


def batch_of(shape: tuple[int, ...], source: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images, labels, what they are): a Fashion-MNIST batch of ``shape`` when asked and installed, else random."""
    if source == "fashion-mnist":
        try:
            data = fxquant.data.fashion_mnist("train", limit=shape[0])
            x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=shape[0])))
            return x, y, "Fashion-MNIST batch"
        except fxquant.data.DataNotFoundError:
            pass
    torch.manual_seed(0)
    return torch.randn(shape), torch.randint(0, 10, (shape[0],)), "random batch"


class TimedStep:
    """One train step (forward, cross-entropy, backward, SGD with momentum, LSQ step clamp) of ``model`` on a fixed
    batch, with ``environment`` set around it; calling it returns the step's seconds."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, environment: dict[str, str]):
        self.model, self.x, self.y = model.train(), x, y
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.environment = environment

    def __call__(self) -> float:
        with environment(self.environment):
            return self._step()

    def _step(self) -> float:
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if isinstance(getattr(self.model, "_orig_mod", self.model), fxquant.QATModel):
            fxquant.quant.clamp_steps(self.model)  # what fxquant.TrainStep does after each step
        return time.perf_counter() - start


@contextlib.contextmanager
def environment(values: dict[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fp_and_w4a4(name: str) -> tuple[nn.Module, fxquant.QATModel, torch.Tensor, torch.Tensor]:
    """Benchmark model ``name`` (seed 0), its calibrated lsq_w4a4 twin, and the batch both step on."""
    bench = MODELS[name]
    x, y, _ = batch_of(bench.shape, bench.data)
    torch.manual_seed(0)
    model = bench.build()
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4", x[:1])
    fxquant.calibrate(qmodel, x)
    return model, qmodel, x, y
