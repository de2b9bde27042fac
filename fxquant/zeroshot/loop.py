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

Our reading where LRQ's text is silent (each an option of ``[zeroshot]``): AMA replaces the generator's plain
cross-entropy when on (margin m = 0.3, scale s = 16); the student's BN layers keep the FP running statistics
(they are not re-estimated on synthetic images) while their affine parameters train; the student uses SGD (momentum 0.9)
at 1e-4 as GDFQ does — with Adam at 1e-3 the synthetic-data updates made a W4A4 resnet20 worse than no
training at all (79.4% vs 84.8%, benchmarks/results/zeroshot.md history).

Example usage::

    qmodel = fxquant.prepare_qat(fp_model, "lrq_w4a4")                  # keeps the FP model as qmodel.float_model
    result = fxquant.zeroshot.train(qmodel)                             # no data at all
    fxquant.zeroshot.save_grid(result.generator, "synthetic.png")
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torchvision.utils import save_image

from fxquant.config.fields import Where, parse
from fxquant.config.sections import ZeroShotConfig
from fxquant.errors import FxQuantError
from fxquant.qat_model import QATModel
from fxquant.quant.controls import clamp_steps
from fxquant.train.devices import model_device
from fxquant.train.distributed import initialize_quantizers
from fxquant.train.loop import REFRESH_SECONDS
from fxquant.train.losses import dkd_terms, kd_loss
from fxquant.train.teachers import float_teacher, freeze

from .generator import Generator
from .objectives import BNStatistics, ama_logits, classifier


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
    config: ZeroShotConfig | dict[str, Any] | None = None,
    teacher: nn.Module | None = None,
    image_shape: tuple[int, int, int] | None = None,
    progress: bool = True,
) -> ZeroShotResult:
    """Zero-shot QAT of ``qmodel`` from its FP ``teacher`` (default ``qmodel.float_model``) with the recipe's
    ``[zeroshot]`` table (``config`` overrides it). ``image_shape`` defaults to the first conv's input
    channels at 28×28. Returns the trained generator and per-iteration metrics.

    Example usage::

        result = fxquant.zeroshot.train(fxquant.prepare_qat(fp_model, "lrq_w4a4"), {"iterations": 200})
    """
    base = qmodel.recipe.zeroshot if isinstance(qmodel, QATModel) else None
    if isinstance(config, ZeroShotConfig):
        settings = config
    else:
        settings = parse(ZeroShotConfig, dict(config or {}), Where("zeroshot.train(config=...)", "zeroshot"), base=base)
    float_model = teacher if teacher is not None else getattr(qmodel, "float_model", None)
    if float_model is None:
        raise FxQuantError(
            "zero-shot quantization needs the FP model: prepare with a [zeroshot] recipe or pass teacher="
        )
    device = model_device(qmodel)
    teacher = float_teacher(qmodel, float_model) if isinstance(qmodel, QATModel) else freeze(float_model).to(device)
    head = classifier(teacher)
    num_classes = head.out_features
    if image_shape is None:
        first = next((m for m in teacher.modules() if isinstance(m, nn.Conv2d)), None)
        image_shape = (first.in_channels if first is not None else 1, 28, 28)
    torch.manual_seed(int(settings.seed))
    with torch.device(device):  # built where the model is
        generator = Generator(
            num_classes, image_shape, settings.latent_dim, settings.generator_channels, settings.long_range
        )
    g_opt = torch.optim.Adam(generator.parameters(), lr=settings.generator_lr, betas=(0.5, 0.999))
    s_params = [p for p in qmodel.parameters() if p.requires_grad]
    if settings.student_optimizer == "adam":
        s_opt = torch.optim.Adam(s_params, lr=settings.student_lr)
    else:  # GDFQ's choice: SGD with momentum at a small rate, the trained weights only need nudging
        s_opt = torch.optim.SGD(s_params, lr=settings.student_lr, momentum=0.9, nesterov=True)
    features: dict[str, torch.Tensor] = {}
    hook = head.register_forward_hook(lambda m, inputs, out: features.__setitem__("penultimate", inputs[0]))
    bns = BNStatistics(teacher)
    result = ZeroShotResult(generator)
    start = time.perf_counter()
    bar = _progress() if progress else None
    iterations, warmup, batch = (
        int(settings.iterations),
        int(settings.warmup_iterations),
        int(settings.batch_size),
    )
    first_batch = True
    shown_at = 0.0
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
                if settings.ama:
                    ce = F.cross_entropy(
                        ama_logits(features["penultimate"], head.weight, y, settings.margin, settings.scale),
                        y,
                    )
                else:
                    ce = F.cross_entropy(logits, y)
                bns_loss = bns.loss()
                g_loss = ce + settings.bns_weight * bns_loss
                g_opt.zero_grad(set_to_none=True)
                g_loss.backward()
                g_opt.step()
                metrics = {"gen_ce": ce.detach(), "bns": bns_loss.detach()}  # read on the host at the end
                # -- student step on the same (detached) images
                if it >= warmup:
                    x = x.detach()
                    qmodel.train()
                    _freeze_bn_statistics(qmodel)
                    if first_batch:
                        initialize_quantizers(qmodel, x)
                        first_batch = False
                    with torch.no_grad():
                        t_logits = teacher(x)
                    s_logits = qmodel(x)
                    if settings.distill == "dkd":
                        tckd, nckd = dkd_terms(s_logits, t_logits, y, settings.T)
                        s_loss = settings.alpha * tckd + settings.beta * nckd
                    else:
                        s_loss = kd_loss(s_logits, t_logits, settings.T)
                    s_opt.zero_grad(set_to_none=True)
                    s_loss.backward()
                    s_opt.step()
                    clamp_steps(qmodel)  # as TrainStep does: stored steps stay positive
                    metrics["student_kd"] = s_loss.detach()
                    metrics["agreement"] = (s_logits.argmax(1) == t_logits.argmax(1)).float().mean()
                result.history.append(metrics)
                if bar:
                    now = time.perf_counter()
                    if now - shown_at >= REFRESH_SECONDS or it + 1 == iterations:  # reading waits for the device
                        shown_at = now
                        shown = " ".join(f"{k} {float(v):.3f}" for k, v in metrics.items())
                        bar.update(task, description=f"zero-shot {it + 1}/{iterations} {shown}")
                    bar.advance(task)
    finally:
        hook.remove()
    result.history = [{key: float(value) for key, value in metrics.items()} for metrics in result.history]
    qmodel.train()
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def save_grid(generator: Generator, path: str | Path, per_class: int = 8, seed: int = 0) -> Path:
    """A PNG grid of synthetic images, one row per class, for inspection.

    Example usage::

        fxquant.zeroshot.save_grid(result.generator, "synthetic.png")
    """
    generator.eval()
    classes = generator.embed.num_embeddings
    g = torch.Generator().manual_seed(seed)
    device = generator.embed.weight.device
    z = torch.randn(classes * per_class, generator.latent_dim, generator=g, device="cpu").to(device)
    y = torch.arange(classes, device=device).repeat_interleave(per_class)
    images = generator(z, y).cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=per_class, normalize=True, scale_each=True)
    return path


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
