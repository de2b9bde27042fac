"""LRQ-style zero-shot quantization: QAT with no real data, on images a generator synthesises from the FP model.

* :class:`Generator` — GDFQ-family generator (label embedding ⊙ z → linear → BN → [up ×2 → conv → BN →
  LeakyReLU(0.2)] ×2 → conv → tanh → BN(affine=False)) with LRQ's large-kernel "long-range attention" blocks
  after each upsampling stage: a = 1×1(dw 7×7 dilation 3(dw 5×5(x))), out = x ⊙ a.
* Generator objective: cross-entropy of the FP model on the generated images for the sampled labels — through
  an additive angular margin (AMA) between the FP penultimate feature and its class centre (the classifier
  weight), ArcFace-style: s·cos(θ_y + m) for the label's logit — plus BN-statistics matching (mean and variance
  of every BN input vs its running statistics).
* Student: decoupled KD (α·TCKD + β·NCKD at temperature T) from the FP model on generated images, plain KD as
  an ablation; generator and student alternate, after a warm-up in which only the generator trains.

Our reading where LRQ's text is silent (METHODS.md): AMA replaces the generator's plain cross-entropy when
on (margin m = 0.3, scale s = 16); the student's BN layers keep the FP running statistics (they are not
re-estimated on synthetic images) while their affine parameters train; the student uses SGD (momentum 0.9)
at 1e-4 as GDFQ does — with Adam at 1e-3 the synthetic-data updates made a W4A4 resnet20 worse than no
training at all (79.4% vs 84.8%, benchmarks/results/zeroshot.md history).

Example usage::

    qmodel = fxquant.prepare_qat(fp_model, "lrq_w4a4")                  # qmodel.teacher is the FP model
    result = fxquant.zeroshot.train(qmodel)                             # no data at all
    fxquant.zeroshot.save_grid(result.generator, "synthetic.png")
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.losses import dkd_terms, kd_loss

ZEROSHOT_DEFAULTS: dict[str, Any] = {
    "iterations": 400,
    "warmup_iterations": 50,
    "batch_size": 64,
    "latent_dim": 100,
    "generator_channels": 64,
    "long_range": True,
    "generator_lr": 1e-3,
    "student_optimizer": "sgd",
    "student_lr": 1e-4,
    "ama": True,
    "margin": 0.3,
    "scale": 16.0,
    "bns_weight": 0.1,
    "distill": "dkd",
    "T": 4.0,
    "alpha": 1.0,
    "beta": 2.0,
    "seed": 0,
}


def dilated_depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """Depthwise k×k convolution with dilation d and "same" zero padding, computed as an undilated k×k
    convolution on each of the d² phase sub-images (x[r::d, s::d]) folded into the batch.

    Exactly ``F.conv2d(x, weight, bias, padding=d·(k−1)/2, dilation=d, groups=C)`` (tested), but faster on CPU,
    where torch's dilated depthwise convolution takes a slower path: forward + backward of a 64×64×28×28 batch,
    7×7 dilation 3, one thread: 0.29 s here vs 0.49 s.
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
        """(z, y): latent codes and uniformly drawn labels."""
        z = torch.randn(n, self.latent_dim, generator=generator)
        y = torch.randint(0, self.embed.num_embeddings, (n,), generator=generator)
        return z, y


def ama_logits(features: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, margin: float, scale: float):
    """s·cos(θ_j + m·[j = y]) with cos θ_j between normalised features and class centres (rows of ``weight``).

    Example usage::

        loss = F.cross_entropy(ama_logits(penultimate, fc.weight, y, 0.3, 16.0), y)
    """
    cosine = F.normalize(features, dim=1) @ F.normalize(weight, dim=1).T
    theta = torch.acos(cosine.clamp(-1 + 1e-6, 1 - 1e-6))
    target = F.one_hot(y, weight.shape[0]).bool()
    return scale * torch.where(target, torch.cos(theta + margin), cosine)


class BNStatistics:
    """Forward hooks on every batch norm of a model: Σ_l (‖μ_l − μ_l^run‖² + ‖σ²_l − σ²_l^run‖²)/L of the
    batch entering each BN (what the generator matches). Use as a context manager around forwards."""

    def __init__(self, model: nn.Module):
        self.layers = [
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        self.terms: list[torch.Tensor] = []
        self.handles: list = []

    def __enter__(self) -> BNStatistics:
        self.terms.clear()
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, module: nn.Module, inputs: tuple, _output) -> None:
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.terms.append((mean - module.running_mean).square().sum() + (var - module.running_var).square().sum())

    def loss(self) -> torch.Tensor:
        if not self.terms:
            raise ValueError("no batch-norm layer saw this forward: BN-statistics matching needs BN layers")
        return torch.stack(self.terms).mean()


def _classifier(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("AMA needs the model's last linear layer (its rows are the class centres)")
    return linears[-1]


@dataclass
class ZeroShotResult:
    generator: Generator
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _freeze_bn_statistics(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train(
    qmodel: nn.Module,
    config: dict[str, Any] | None = None,
    teacher: nn.Module | None = None,
    image_shape: tuple[int, int, int] | None = None,
    progress: bool = True,
) -> ZeroShotResult:
    """Zero-shot QAT of ``qmodel`` from its FP ``teacher`` (default ``qmodel.teacher``) with the recipe's
    ``[zeroshot]`` table (``config`` overrides it). ``image_shape`` defaults to the first conv's input
    channels at 28×28. Returns the trained generator and per-iteration metrics.

    Example usage::

        result = fxquant.zeroshot.train(fxquant.prepare_qat(fp_model, "lrq_w4a4"), {"iterations": 200})
    """
    recipe = getattr(qmodel, "recipe", None)
    settings = {
        **ZEROSHOT_DEFAULTS,
        **(recipe.data.get("zeroshot", {}) if recipe is not None else {}),
        **(config or {}),
    }
    teacher = teacher if teacher is not None else getattr(qmodel, "teacher", None)
    if teacher is None:
        raise ValueError("zero-shot quantization needs the FP model: prepare with a [zeroshot] recipe or pass teacher=")
    teacher.eval()
    classifier = _classifier(teacher)
    num_classes = classifier.out_features
    if image_shape is None:
        first = next((m for m in teacher.modules() if isinstance(m, nn.Conv2d)), None)
        image_shape = (first.in_channels if first is not None else 1, 28, 28)
    torch.manual_seed(int(settings["seed"]))
    generator = Generator(
        num_classes, image_shape, settings["latent_dim"], settings["generator_channels"], settings["long_range"]
    )
    g_opt = torch.optim.Adam(generator.parameters(), lr=settings["generator_lr"], betas=(0.5, 0.999))
    s_params = [p for p in qmodel.parameters() if p.requires_grad]
    if settings["student_optimizer"] == "adam":
        s_opt = torch.optim.Adam(s_params, lr=settings["student_lr"])
    else:  # GDFQ's choice: SGD with momentum at a small rate, the trained weights only need nudging
        s_opt = torch.optim.SGD(s_params, lr=settings["student_lr"], momentum=0.9, nesterov=True)
    features: dict[str, torch.Tensor] = {}
    hook = classifier.register_forward_hook(lambda m, inputs, out: features.__setitem__("penultimate", inputs[0]))
    bns = BNStatistics(teacher)
    result = ZeroShotResult(generator)
    start = time.perf_counter()
    bar = _progress() if progress else None
    iterations, warmup, batch = (
        int(settings["iterations"]),
        int(settings["warmup_iterations"]),
        int(settings["batch_size"]),
    )
    first_batch = True
    try:
        with bar or contextlib.nullcontext():
            task = bar.add_task("zero-shot", total=iterations) if bar else None
            for it in range(iterations):
                # -- generator step: the FP model should recognise its label, with margin, and see BN-like data
                generator.train()
                z, y = generator.sample(batch)
                x = generator(z, y)
                with bns:
                    logits = teacher(x)
                if settings["ama"]:
                    ce = F.cross_entropy(
                        ama_logits(
                            features["penultimate"], classifier.weight, y, settings["margin"], settings["scale"]
                        ),
                        y,
                    )
                else:
                    ce = F.cross_entropy(logits, y)
                bns_loss = bns.loss()
                g_loss = ce + settings["bns_weight"] * bns_loss
                g_opt.zero_grad(set_to_none=True)
                g_loss.backward()
                g_opt.step()
                metrics = {"gen_ce": float(ce.detach()), "bns": float(bns_loss.detach())}
                # -- student step on the same (detached) images
                if it >= warmup:
                    x = x.detach()
                    qmodel.train()
                    _freeze_bn_statistics(qmodel)
                    if first_batch:
                        from fxquant.distributed import initialize_quantizers

                        initialize_quantizers(qmodel, x)
                        first_batch = False
                    with torch.no_grad():
                        t_logits = teacher(x)
                    s_logits = qmodel(x)
                    if settings["distill"] == "dkd":
                        tckd, nckd = dkd_terms(s_logits, t_logits, y, settings["T"])
                        s_loss = settings["alpha"] * tckd + settings["beta"] * nckd
                    else:
                        s_loss = kd_loss(s_logits, t_logits, settings["T"])
                    s_opt.zero_grad(set_to_none=True)
                    s_loss.backward()
                    s_opt.step()
                    metrics["student_kd"] = float(s_loss.detach())
                    metrics["agreement"] = float((s_logits.argmax(1) == t_logits.argmax(1)).float().mean())
                result.history.append(metrics)
                if bar:
                    shown = " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                    bar.update(task, advance=1, description=f"zero-shot {it + 1}/{iterations} {shown}")
    finally:
        hook.remove()
    qmodel.train()
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def save_grid(generator: Generator, path: str | Path, per_class: int = 8, seed: int = 0) -> Path:
    """A PNG grid of synthetic images, one row per class, for inspection.

    Example usage::

        fxquant.zeroshot.save_grid(result.generator, "synthetic.png")
    """
    from torchvision.utils import save_image

    generator.eval()
    classes = generator.embed.num_embeddings
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(classes * per_class, generator.latent_dim, generator=g)
    y = torch.arange(classes).repeat_interleave(per_class)
    images = generator(z, y)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=per_class, normalize=True, scale_each=True)
    return path


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
