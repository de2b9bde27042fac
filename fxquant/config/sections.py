"""The typed tables of a recipe, one frozen dataclass each, every default written once.

``[quant]`` → :class:`QuantSection`, ``[train]`` → :class:`TrainConfig`, each ``[[loss]]`` → one of
:data:`LOSS_KINDS`, ``[optim.sam]`` → :class:`SAMConfig`, ``[search]`` → :class:`SearchConfig`,
``[data.coreset]`` → :class:`CoresetConfig`, ``[zeroshot]`` → :class:`ZeroShotConfig`, ``[bits]`` →
:class:`BitsConfig`. Validation is derived from the fields (:mod:`fxquant.config.fields`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from fxquant.quant.spec import QuantizerConfig, bits_problem
from fxquant.quant.taps import parse_selector

from .fields import Section, fraction, non_negative, open_unit, positive, probability, setting


def _bits(value: Any) -> str | None:
    return bits_problem(value)


PRECISIONS = ("fp32", "bf16", "fp16")


def device_problem(value: Any) -> str | None:
    """Why ``value`` is not a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or another torch device), or
    None. Whether that device exists here is checked when a run starts, not when a recipe is read."""
    if value == "auto":
        return None
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        return f"must be auto, cpu, cuda, cuda:N or another torch device; got {value!r}"
    return None


def selector_problem(value: str) -> str | None:
    """Why ``value`` is not a tap selector, or None."""
    try:
        parse_selector(value)
    except ValueError as err:
        return str(err)
    return None


# -- [quant] ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerBits(Section):
    """``first_layer`` / ``last_layer``: widths that replace the recipe's for the graph's end layers."""

    weight_bits: int | None = setting(None, check=_bits)
    activation_bits: int | None = setting(None, check=_bits)
    activation_scheme: str | None = setting(
        None,
        choices=QuantizerConfig.__dataclass_fields__["scheme"].metadata["choices"],
        doc="the layer's input quantizer scheme; \"observer\" on the first layer keeps the network input's range "
        "observed, not learned, so no gradient flows back to the input (its convolution skips a backward pass)",
    )

    def __bool__(self) -> bool:
        return self.weight_bits is not None or self.activation_bits is not None or self.activation_scheme is not None


@dataclass(frozen=True)
class QuantizerOverride(Section):
    """A rule's partial ``weight`` / ``activation`` table: only the keys it sets change a config."""

    bits: int | None = setting(None, check=_bits)
    scheme: str | None = setting(None, choices=QuantizerConfig.__dataclass_fields__["scheme"].metadata["choices"])
    granularity: str | None = setting(
        None, choices=QuantizerConfig.__dataclass_fields__["granularity"].metadata["choices"]
    )
    symmetric: bool | None = setting(None)
    observer: str | None = setting(None, choices=QuantizerConfig.__dataclass_fields__["observer"].metadata["choices"])
    init: str | None = setting(None, choices=QuantizerConfig.__dataclass_fields__["init"].metadata["choices"])
    group_size: int | None = setting(None, check=QuantizerConfig.__dataclass_fields__["group_size"].metadata["check"])

    def changes(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def apply(self, config: QuantizerConfig) -> QuantizerConfig:
        changes = self.changes()
        return replace(config, **changes) if changes else config


@dataclass(frozen=True)
class Match(Section):
    name: tuple[str, ...] = setting((), one_or_many=True, doc="glob patterns on the qualified layer name")
    type: tuple[str, ...] = setting((), one_or_many=True, doc="layer types, case-insensitive (Conv2d, linear)")


@dataclass(frozen=True)
class Rule(Section):
    """One ``[[quant.rule]]``: layers whose name and type match get these weight/activation overrides."""

    match: Match = setting(Match())
    weight: QuantizerOverride = setting(QuantizerOverride())
    activation: QuantizerOverride = setting(QuantizerOverride())
    index: int = field(default=0, metadata={"internal": True})

    def matches(self, layer_name: str, layer_type: str) -> bool:
        """Glob match on the qualified name; case-insensitive match on the type (``Conv2d`` also matches
        a functional ``conv2d``)."""
        name_ok = not self.match.name or any(fnmatch.fnmatchcase(layer_name, p) for p in self.match.name)
        type_ok = not self.match.type or layer_type.lower() in {t.lower() for t in self.match.type}
        return name_ok and type_ok

    @property
    def key_path(self) -> str:
        return f"quant.rule[{self.index}]"


@dataclass(frozen=True)
class QuantSection(Section):
    weight: QuantizerConfig = setting(QuantizerConfig(granularity="per_channel", symmetric=True))
    activation: QuantizerConfig = setting(QuantizerConfig(granularity="per_tensor", symmetric=False))
    first_layer: LayerBits = setting(LayerBits())
    last_layer: LayerBits = setting(LayerBits())
    bn: str = setting("keep", choices=("keep", "fold"), doc="keep batch norm, or fold it into the conv")
    leaf_modules: tuple[str, ...] = setting((), one_or_many=True, doc="module paths kept whole and in float")
    attention: str = setting(
        "fused",
        choices=("fused", "explicit"),
        doc="F.scaled_dot_product_attention calls: fused (q, k, v quantized) or explicit (matmuls, softmax output "
        "quantized too)",
    )
    fuse_activations: bool = setting(
        True,
        doc="fold a ReLU, ReLU6 or Hardtanh whose only reader is an activation quantizer into it (the same values "
        "and gradients, without a pass of its own)",
    )
    rule: tuple[Rule, ...] = setting((), doc="ordered overrides; the last match wins")

    def __post_init__(self) -> None:
        super().__post_init__()
        # rules know their position (for error messages), and their overrides must make valid configs
        object.__setattr__(self, "rule", tuple(replace(r, index=i) for i, r in enumerate(self.rule)))
        for role in ("weight", "activation"):
            problem = getattr(self, role).role_problem(role)
            if problem:
                raise ValueError(f"quant.{role}: {problem}")
        for r in self.rule:
            for role in ("weight", "activation"):
                try:
                    config = getattr(r, role).apply(getattr(self, role))
                except ValueError as err:
                    raise ValueError(f"{r.key_path}.{role}: {err}") from None
                problem = config.role_problem(role)
                if problem:
                    raise ValueError(f"{r.key_path}.{role}: {problem}")

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.rule


# -- [train] ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig(Section):
    """``[train]``: what ``fxquant.fit`` runs."""

    epochs: int = setting(1, check=positive)
    batch_size: int = setting(128, check=positive, doc="the global batch (split across data-parallel ranks)")
    optimizer: str = setting("sgd", choices=("sgd", "adamw"))
    lr: float = setting(0.01, check=positive)
    quantizer_lr: float | None = setting(None, check=positive, doc="quantizer steps' lr (default: lr)")
    momentum: float = setting(0.9, check=non_negative)
    weight_decay: float = setting(1e-4, check=non_negative)
    schedule: str = setting("cosine", choices=("cosine", "constant"))
    warmup_epochs: int = setting(0, check=non_negative)
    label_smoothing: float = setting(0.0, check=probability)
    ce_weight: float = setting(
        1.0, check=non_negative, doc="weight of the cross-entropy; 0 with a kd loss = KD-only (ACS's protocol)"
    )
    compile: bool = setting(False, doc="torch.compile the training forward and backward (after calibration)")
    device: str = setting(
        "auto", check=device_problem, doc="auto (the model's GPU, else CUDA when present, else CPU), cpu, cuda[:N]"
    )
    precision: str = setting(
        "fp32", choices=PRECISIONS, doc="fp32, or autocast to bf16 / fp16 (fp16 with a gradient scaler)"
    )


# -- [[loss]] -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossConfig(Section):
    """What every ``[[loss]]`` has: its weight and a sigmoid ramp-up. ``kind`` selects the subclass."""

    kind: ClassVar[str] = ""
    weight: float = setting(1.0, check=non_negative, doc="multiplies the term")
    ramp_epochs: float = setting(0.0, check=non_negative, doc="sigmoid ramp-up of the weight over these epochs")

    @property
    def teacher_kind(self) -> str | None:
        """Which teacher the loss reads: ``"fp"`` (the float model), ``"ema"`` or None."""
        return None

    def taps(self) -> dict[str, str]:
        """Tap name → selector that the loss reads from the student (and its teacher)."""
        return {}


@dataclass(frozen=True)
class KDConfig(LossConfig):
    kind: ClassVar[str] = "kd"
    T: float = setting(4.0, check=positive, doc="temperature")

    @property
    def teacher_kind(self) -> str | None:
        return "fp"


@dataclass(frozen=True)
class DKDConfig(LossConfig):
    kind: ClassVar[str] = "dkd"
    T: float = setting(4.0, check=positive, doc="temperature")
    alpha: float = setting(1.0, check=non_negative, doc="TCKD weight")
    beta: float = setting(8.0, check=non_negative, doc="NCKD weight")

    @property
    def teacher_kind(self) -> str | None:
        return "fp"


@dataclass(frozen=True)
class ConsistencyConfig(LossConfig):
    kind: ClassVar[str] = "consistency"
    teacher: str = setting("ema", choices=("ema", "fp"), doc="EMA of the student, or the FP model")
    ema_decay: float = setting(0.999, check=open_unit)
    ema_warmup: bool = setting(True, doc="decay min(ema_decay, 1 − 1/(t+1)) at step t, as Mean Teacher")
    ema_mode: str = setting(
        "train",
        choices=("train", "eval"),
        doc="the EMA teacher runs in train mode with its own BN statistics (Mean Teacher), or in eval mode with "
        "the student's statistics copied every step (fxquant before 0.3)",
    )
    strong_view: str = setting(
        "teacher", choices=("teacher", "student"), doc="which network sees the strongly augmented view"
    )
    T: float = setting(1.0, check=positive, doc="temperature of the logit KL")
    logits: bool = setting(True, doc="KL between softened logits")
    tap: str | None = setting(None, doc="a tap name or selector for an extra feature MSE")
    feature_weight: float = setting(1.0, check=non_negative, doc="weight of the feature MSE")

    @property
    def teacher_kind(self) -> str | None:
        return self.teacher

    def taps(self) -> dict[str, str]:
        return {self.tap: self.tap} if self.tap else {}


@dataclass(frozen=True)
class FPQConfig(LossConfig):
    kind: ClassVar[str] = "fpq"
    p: float = setting(0.1, check=probability, doc="perturbation probability per layer per forward")
    layers: str = setting("Conv2d", doc="op type perturbed and distilled")
    csd: bool = setting(True, doc="channel-wise standardization distillation")
    normalize: str = setting("mean", choices=("mean", "batch", "sum"), doc="per-layer reduction")
    eps: float = setting(1e-5, check=positive, doc="variance epsilon")

    @property
    def teacher_kind(self) -> str | None:
        return "fp" if self.csd else None

    @property
    def tap_name(self) -> str:
        """The tap CSD distils: the outputs of every op of the perturbed type."""
        return f"fpq:{self.layers}"

    def taps(self) -> dict[str, str]:
        return {self.tap_name: f"type:{self.layers}"} if self.csd else {}


@dataclass(frozen=True)
class MECConfig(LossConfig):
    kind: ClassVar[str] = "mec"
    tap: str = setting("penultimate", doc="feature tap name or selector")
    eps2: float = setting(64.0, check=positive, doc="distortion ε²")
    order: int = setting(4, check=positive, doc="Taylor order K")
    experts: int = setting(1, check=positive, doc="channel-group experts (1 = plain MEC)")
    lambda_warmup: float = setting(
        0.1, check=probability, doc="fraction of the run over which λ⁻¹ goes from 8/λ to 1/λ (reference: 10%)"
    )
    scale: str = setting(
        "lambda_inv",
        choices=("lambda_inv", "mu"),
        doc="multiply the coding-length series by λ⁻¹ (reference: first-order term = mean cosine) or by μ",
    )
    features: str = setting(
        "standardize",
        choices=("standardize", "raw"),
        doc="code batch-standardised features (the reference's projector ends in BN without affine) or raw ones",
    )
    gate: str = setting(
        "equal",
        choices=("equal", "learned"),
        doc="how the experts' coding lengths are weighted: equally, or by a learned per-sample gate",
    )
    balance: float = setting(
        1.0,
        check=non_negative,
        doc="learned gate: weight β of the load-balancing term β·CV(importance)² (MoE practice; see fxquant.train."
        "losses.mec for why 1 and not MoE's usual 0.01)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gate == "learned" and self.experts < 2:
            raise ValueError('gate = "learned" routes between experts: set experts to 2 or more')

    def taps(self) -> dict[str, str]:
        return {self.tap: self.tap}


LOSS_KINDS: Mapping[str, type[LossConfig]] = {
    cls.kind: cls for cls in (KDConfig, DKDConfig, ConsistencyConfig, FPQConfig, MECConfig)
}


# -- [optim.sam] --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SAMConfig(Section):
    """Sharpness-aware minimization (SAQ) of the training step."""

    rho: float = setting(0.05, check=positive, doc="neighbourhood radius")
    adaptive: bool = setting(False, doc="ASAM's scale-invariant neighbourhood")
    perturb: str = setting("quantized", choices=("quantized", "latent"), doc="where ε is added (SAQ: quantized)")
    # SAQ's own defaults (include_bn, include_aclip on; BN statistics update in both passes)
    perturb_bn: bool = setting(True, doc="also perturb BN affine parameters")
    perturb_steps: bool = setting(True, doc="also perturb activation quantizer steps")
    update_bn_in_second_pass: bool = setting(True, doc="let BN running statistics update in the second pass")


@dataclass(frozen=True)
class OptimSection(Section):
    sam: SAMConfig | None = setting(None, doc="sharpness-aware minimization (SAQ)")


# -- [search] -----------------------------------------------------------------------------------------------------
BUDGET_RATIO = re.compile(r"([0-9.eE+-]+)x(W(\d+)A(\d+)|FP32)", flags=re.IGNORECASE)
BUDGET_AVERAGE = re.compile(r"avg([0-9.]+)", flags=re.IGNORECASE)
BUDGET_SIZE = re.compile(r"size:([0-9.eE+]+)([kKmMgG]?i?[bB])")
BUDGET_HELP = "use e.g. 0.25xW8A8, 0.5xFP32, avg3, 1.2e9 (BOPs) or size:150kB"


def budget_problem(text: str) -> str | None:
    """Why ``text`` is not a budget (see :func:`fxquant.search.parse_budget`), or None."""
    spec = text.strip().replace(" ", "")
    if BUDGET_RATIO.fullmatch(spec) or BUDGET_AVERAGE.fullmatch(spec) or BUDGET_SIZE.fullmatch(spec):
        return None
    try:
        value = float(spec)
    except ValueError:
        return f"budget {text!r} not understood; {BUDGET_HELP}"
    return None if value > 0 and value != float("inf") else f"budget must be a positive finite number, got {text!r}"


@dataclass(frozen=True)
class SearchConfig(Section):
    """Per-layer bit search before training."""

    budget: str = setting(check=budget_problem, doc=BUDGET_HELP)
    method: str = setting("hessian", choices=("hessian", "sam", "saq"), doc="sensitivity measure, or SAQ's generator")
    iterations: int = setting(100, check=positive, doc="generator iterations for method = saq")
    candidates: tuple[int, ...] | None = setting(
        None, check=_bits, doc="bit widths to choose from (default: 2, 3, 4, 5 for saq as its authors; else 2, 3, 4, 8)"
    )
    batches: int = setting(2, check=positive, doc="calibration batches")
    tol: float = setting(1e-3, check=positive, doc="Hutchinson relative tolerance (HAWQ/PyHessian: 1e-3)")
    max_iterations: int = setting(100, check=positive, doc="Hutchinson iterations at most (HAWQ/PyHessian: 100)")
    activations: bool = setting(
        True, doc="Ω counts the input activations' sensitivity too (a plan ties weight and activation widths)"
    )
    rho: float = setting(0.05, check=positive, doc="SAM radius for method = sam")
    search_first_last: bool = setting(False, doc="search the first/last layers too; avgB budgets count them at 8")
    warmup_iterations: int = setting(
        50, check=non_negative, doc="method = saq: supernet steps on shuffled data before the controller learns"
    )
    budget_slack: float = setting(
        0.05, check=probability, doc="method = saq: the pick costs between (1 − slack)× and 1× the budget"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.candidates is not None and not self.candidates:
            raise ValueError("candidates must list at least one width")

    @property
    def widths(self) -> tuple[int, ...]:
        """The candidate widths in force."""
        if self.candidates is not None:
            return self.candidates
        return (2, 3, 4, 5) if self.method == "saq" else (2, 3, 4, 8)


# -- [data.coreset] -----------------------------------------------------------------------------------------------
CORESET_SCHEDULES = ("paper", "code_cosine", "linear", "ds_first")
CORESET_SCORES = ("evs", "ds")


@dataclass(frozen=True)
class CoresetConfig(Section):
    """Adaptive coreset selection (ACS)."""

    fraction: float = setting(check=fraction, doc="kept per class, in (0, 1]")
    refresh_every: int = setting(10, check=positive, doc="epochs between selections")
    schedule: str = setting("paper", choices=CORESET_SCHEDULES, doc="β(t), the weight of EVS")
    scores: tuple[str, ...] = setting(CORESET_SCORES, choices=CORESET_SCORES, doc="which scores are combined")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.scores:
            raise ValueError("scores must be a non-empty list of 'evs' and 'ds'")

    @property
    def needs_fp(self) -> bool:
        return "ds" in self.scores


@dataclass(frozen=True)
class DataSection(Section):
    coreset: CoresetConfig | None = setting(None, doc="adaptive coreset selection (ACS)")


# -- [zeroshot] ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroShotConfig(Section):
    """Zero-shot quantization (LRQ)."""

    iterations: int = setting(400, check=positive)
    warmup_iterations: int = setting(50, check=non_negative, doc="generator-only iterations first")
    batch_size: int = setting(64, check=positive)
    latent_dim: int = setting(100, check=positive)
    generator_channels: int = setting(64, check=positive)
    long_range: bool = setting(True, doc="LRQ's large-kernel attention blocks in the generator")
    generator_lr: float = setting(1e-3, check=positive)
    student_optimizer: str = setting("sgd", choices=("sgd", "adam"), doc="sgd has momentum 0.9")
    student_lr: float = setting(1e-4, check=positive)
    ama: bool = setting(True, doc="additive angular margin in the generator's cross-entropy")
    margin: float = setting(0.3, check=non_negative, doc="AMA margin m (radians)")
    scale: float = setting(16.0, check=positive, doc="AMA logit scale s")
    bns_weight: float = setting(0.1, check=non_negative, doc="BN-statistics matching weight")
    distill: str = setting("dkd", choices=("dkd", "kd"), doc="student loss")
    T: float = setting(4.0, check=positive)
    alpha: float = setting(1.0, check=non_negative)
    beta: float = setting(2.0, check=non_negative)
    seed: int = setting(0)


# -- [bits] -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerWidths(Section):
    """One layer of a bit plan."""

    weight: int | None = setting(None, check=_bits)
    activation: int | None = setting(None, check=_bits)


@dataclass(frozen=True)
class BitsConfig(Section):
    """``[bits]``: per-layer widths, from a plan file (``plan``) or written inline (``[bits.layers]``)."""

    plan: str | None = setting(None, doc="a bit-plan TOML (from fxquant search), relative to the declaring recipe")
    layers: dict[str, LayerWidths] = setting(None, doc="layer name = { weight = b, activation = b }")

    def widths(self) -> dict[str, tuple[int | None, int | None]] | None:
        if self.layers is None:
            return None
        return {name: (w.weight, w.activation) for name, w in self.layers.items()}
