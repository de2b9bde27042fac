"""MEC-Quant: maximum entropy coding (Liu et al. 2022) as a QAT regulariser, with a mixture-of-experts form.

MEC maximises the coding length of the features of two views, L = −μ·log det(I + λ Z₁Z₂ᵀ) with Z₁, Z₂ the
L2-normalised features (m samples × d dims), μ = (m + d)/2, λ = d/(m·ε²), computed by its Taylor series
tr(Σ_{k=1..K} (−1)^{k+1}/k · (λ Z₁Z₂ᵀ)^k) and divided by m. Since tr((Z₁Z₂ᵀ)^k) = tr((Z₂ᵀZ₁)^k), the series
runs on whichever of the m×m and d×d products is smaller: O(m·d·min(m, d)) time.

As the authors' code (xinliu20/MEC) does, and by default: the series is scaled by λ⁻¹ rather than μ (so its
first-order term is the mean cosine between the views, O(1) whatever m and d), the coded features are centred
and standardised per dimension over the batch (the reference's projector ends in BatchNorm without affine), and
λ⁻¹ warms up from 8/λ to 1/λ over the first 10% of the run (the reference: 10 of 100 epochs). The earlier form
(μ scaling, raw post-ReLU features) stays as ``scale = "mu"``, ``features = "raw"``. The reference's learned
projector and EMA teacher are not used: MEC-Quant codes the student's own features on two views.

Mixture of experts (our reading: MEC-Quant's details were not available): the d channels are split into E
groups ("experts"), each L2-normalised and coded on its own (its own μ_e, λ_e), and the coding lengths are
combined with equal gate weights 1/E (``gate = "equal"``). Each expert's series runs on d/E × d/E matrices, so
the cost falls from O(m·d²) to O(m·d²/E) when d < m.

``gate = "learned"`` routes each sample: a softmax gate g(x) ∈ Δ^E (:class:`ExpertGate`) weights sample i's row
in expert e by √(E·g_ie) on both views, so expert e codes the samples routed to it and the equal gate is the
special case g = 1/E (the gate starts there: it is zero-initialised). Minimising the coding length alone would
pour every sample into whichever expert codes most cheaply, so, as in MoE practice (Shazeer et al. 2017), a
load-balancing term β·CV(importance)² is added, importance_e = Σ_i g_ie over the batch (``balance`` = β). β is
1, not MoE's usual 0.01: scaled by λ⁻¹ the coding length is about a mean cosine, so routing every sample to the
cheapest expert gains at most about 2, while CV² reaches E − 1 at that collapse. At 0.01 a gate still collapsed
completely in the test that checks this (a max load share of 0.9996 at 0, 0.01 and 0.1; 0.34 at 1, of 1/4
ideal). The gate's parameters belong to the loss; :class:`fxquant.TrainStep` adds them to the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.config.sections import MECConfig

from .base import AuxLoss, LossInputs, feature_gradient_ratio


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each feature dimension centred and scaled to unit variance over the batch: BatchNorm1d without affine in
    training mode, what the reference's projector ends in. Post-ReLU features are all positive, so uncentred
    their cosine similarities sit near 1 and λZ₁Z₂ᵀ has a spectral radius near its maximum, about 0.8 here,
    against about 0.01 once centred."""
    z = z.flatten(1)
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


def mec_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    eps2: float = 64.0,
    order: int = 4,
    lambda_scale: float = 1.0,
    scale: str = "lambda_inv",
    standardized: bool = True,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The negative coding length of features (m, d) of two views, by its Taylor series of order ``order``.

    With ``scale = "lambda_inv"`` (the reference's): −λ⁻¹·tr(Σ_k (−1)^{k+1}/k (λZ₁Z₂ᵀ)^k)/m, whose first-order
    term is minus the mean cosine between the views; ``"mu"``: the series times μ = (m + d)/2 instead.
    ``lambda_scale`` multiplies λ (the warm-up runs it 1/8 → 1); features are L2-normalised here, after batch
    standardisation when ``standardized``; ``row_weights`` (m, 1) then scale each sample's rows (a gate's).

    Example usage::

        loss = mec_loss(features_view1, features_view2)
    """
    if standardized:
        z1, z2 = standardize(z1), standardize(z2)
    z1 = F.normalize(z1.flatten(1), dim=1)
    z2 = F.normalize(z2.flatten(1), dim=1)
    if row_weights is not None:
        z1, z2 = z1 * row_weights, z2 * row_weights
    m, d = z1.shape
    lam = lambda_scale * d / (m * eps2)
    c = lam * (z1 @ z2.T if m <= d else z2.T @ z1)
    power = c
    series = torch.diagonal(power).sum()
    for k in range(2, order + 1):
        power = power @ c
        series = series + (-1) ** (k + 1) / k * torch.diagonal(power).sum()
    factor = 1.0 / lam if scale == "lambda_inv" else (m + d) / 2
    return -factor * series / m


def mec_moe_loss(
    z1: torch.Tensor, z2: torch.Tensor, experts: int, gates: torch.Tensor | None = None, **options: Any
) -> torch.Tensor:
    """MEC over ``experts`` channel groups, each coded separately (``options`` as :func:`mec_loss` takes them)
    and averaged. ``gates`` (m, E), rows summing to 1, route samples: expert e weights sample i's rows by
    √(E·g_ie); None is the equal gate. One expert is :func:`mec_loss` itself.

    Example usage::

        loss = mec_moe_loss(features_view1, features_view2, experts=4)
    """
    z1, z2 = z1.flatten(1), z2.flatten(1)
    if experts > z1.shape[1]:
        raise ValueError(f"{experts} experts for {z1.shape[1]} feature channels: at most one expert per channel")
    groups = zip(torch.tensor_split(z1, experts, dim=1), torch.tensor_split(z2, experts, dim=1))
    total = z1.new_zeros(())
    for e, (a, b) in enumerate(groups):
        # the floor keeps sqrt's gradient finite where a softmax weight underflows to 0
        weights = None if gates is None else (experts * gates[:, e : e + 1]).clamp_min(1e-12).sqrt()
        total = total + mec_loss(a, b, row_weights=weights, **options)
    return total / experts


class ExpertGate(nn.Module):
    """A per-sample softmax gate over E channel-group experts. Its input is each sample's root-mean-square
    feature in each group (E numbers), detached: the gate routes samples, it does not shape the features. Zero
    initialised, so it starts as the equal gate.

    Example usage::

        gate = ExpertGate(4)
        g = gate(features_view1, features_view2)            # (m, 4), rows sum to 1
    """

    def __init__(self, experts: int):
        super().__init__()
        self.experts = experts
        self.route = nn.Linear(experts, experts)
        nn.init.zeros_(self.route.weight)
        nn.init.zeros_(self.route.bias)

    def forward(self, *views: torch.Tensor) -> torch.Tensor:
        """Gate weights (m, E) for features (m, d) of one or more views of the same samples (their mean RMS)."""
        rms = sum(self._group_rms(z) for z in views) / len(views)
        return F.softmax(self.route(rms), dim=1)

    def _group_rms(self, z: torch.Tensor) -> torch.Tensor:
        groups = torch.tensor_split(z.detach().flatten(1), self.experts, dim=1)
        return torch.stack([g.pow(2).mean(1).sqrt() for g in groups], dim=1)


def importance_balance(gates: torch.Tensor) -> torch.Tensor:
    """CV(importance)², importance_e = Σ_i g_ie: 0 when every expert receives the same total weight (Shazeer et
    al. 2017's importance loss, population variance).

    Example usage::

        importance_balance(torch.full((8, 4), 0.25))     # 0
    """
    importance = gates.sum(0)
    return importance.var(unbiased=False) / importance.mean().pow(2).clamp_min(1e-12)


DIAGNOSE_EVERY = 20


class MECLoss(AuxLoss[MECConfig]):
    """Recipe ``kind = "mec"``: the student on two views; coding length of the tapped features. Its diagnostics
    report ``grad_ratio``: the norm of this term's gradient at the features over the cross-entropy's, so a user
    sees whether the regulariser acts at all."""

    student_views = (0, 1)
    teacher_views = ()

    def __init__(self, config: MECConfig, name: str | None = None):
        super().__init__(config, name)
        self.steps = 0
        self.gate = ExpertGate(config.experts) if config.gate == "learned" else None

    def parameters(self) -> list[nn.Parameter]:
        return list(self.gate.parameters()) if self.gate is not None else []

    def to(self, device: torch.device) -> MECLoss:
        if self.gate is not None:
            self.gate.to(device)
        return self

    def lambda_scale(self, progress: float, total: float) -> float:
        """λ's multiplier: 1/8 → 1 over the first ``lambda_warmup`` of the run (λ⁻¹ from 8/λ to 1/λ, linear)."""
        warmup = self.config.lambda_warmup * total
        t = 1.0 if warmup <= 0 else min(max(progress, 0.0) / warmup, 1.0)
        return 1.0 / (8.0 - 7.0 * t)

    def compute(self, inputs: LossInputs) -> dict[str, torch.Tensor]:
        tap = self.config.tap
        z1, z2 = inputs.student[0].taps[tap], inputs.student[1].taps[tap]
        lambda_scale = self.lambda_scale(inputs.progress, inputs.total)
        c = self.config
        # standardising each dimension commutes with the split into channel groups: done once, here, for the gate
        # (one routing for both views of a sample, from what the experts code) and for every expert
        coded1, coded2 = (standardize(z1), standardize(z2)) if c.features == "standardize" else (z1, z2)
        gates = self.gate(coded1, coded2) if self.gate is not None else None
        value = mec_moe_loss(
            coded1,
            coded2,
            c.experts,
            gates,
            eps2=c.eps2,
            order=c.order,
            lambda_scale=lambda_scale,
            scale=c.scale,
            standardized=False,
        )
        # two extra partial backward passes: measured on every DIAGNOSE_EVERY-th step only, not in the hot path
        self.steps += 1
        self.diagnostics = {}
        if self.steps % DIAGNOSE_EVERY == 1:
            weighted = value * self.weight_at(inputs.progress)
            self.diagnostics = {"grad_ratio": feature_gradient_ratio(weighted, inputs, z1)}
        if gates is None:
            return {"": value}
        importance = gates.detach().sum(0)
        self.diagnostics["gate_max_share"] = importance.max() / importance.sum()  # 1/E balanced, 1 collapsed
        return {"": value, "balance": c.balance * importance_balance(gates)}
