"""QuantizerConfig and QuantSpec: how one tensor is fake-quantized, and what one quantizable layer gets.

``QuantizerConfig`` is also the recipe's ``quant.weight`` / ``quant.activation`` table: its fields carry their
choices and docs in dataclass metadata, which the recipe parser (:mod:`fxquant.config.fields`) reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

SCHEMES = ("lsq", "lsq_plus", "observer")
GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group")
ACTIVATION_GRANULARITIES = ("per_tensor", "per_channel", "per_token")
OBSERVERS = ("minmax", "moving_average", "histogram")
INITS = ("default", "mse")
FULL_PRECISION_BITS = (16, 32)


def bits_problem(bits: object, what: str = "bits") -> str | None:
    """Why ``bits`` is not a valid width (2..8, or 16/32 for full precision), or None."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        return f"{what} must be an integer, got {bits!r}"
    if not (2 <= bits <= 8 or bits in FULL_PRECISION_BITS):
        return f"{what} must be 2..8, or 16/32 for full precision; got {bits}"
    return None


def check_bits(bits: int, what: str = "bits") -> None:
    """Raise ValueError unless ``bits`` is 2..8, or 16/32 (meaning full precision, a pass-through)."""
    problem = bits_problem(bits, what)
    if problem:
        raise ValueError(problem)


def _group_size_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"group_size must be a positive integer, got {value!r}"
    return None


def _choice(default: str, choices: tuple[str, ...], doc: str) -> str:
    return field(default=default, metadata={"choices": choices, "doc": doc})


@dataclass(frozen=True)
class QuantizerConfig:
    """How one tensor is fake-quantized.

    Example usage::

        QuantizerConfig(bits=4, scheme="lsq", granularity="per_channel", symmetric=True)
    """

    bits: int = field(default=8, metadata={"check": bits_problem, "doc": "2..8, or 16/32 for full precision"})
    scheme: str = _choice("lsq", SCHEMES, "learned step (LSQ), learned step and offset (LSQ+), or observed range")
    granularity: str = _choice(
        "per_tensor",
        GRANULARITIES,
        "one step per tensor, per output channel, per group of group_size input channels (weights), or per token "
        "from each token's range on every forward (activations, dynamic: nothing learned)",
    )
    symmetric: bool = field(default=True, metadata={"doc": "symmetric grid (no offset)"})
    observer: str = _choice("minmax", OBSERVERS, "range statistics of scheme = observer")
    # How a learned step (and offset) starts: "default" is LSQ's 2·mean|x|/sqrt(Qp) for symmetric and the
    # batch min/max for LSQ+; "mse" the clipping range that minimises the squared quantization error (LSQ+'s
    # recommendation; at 2-bit activations min/max puts most values on the zero level).
    init: str = _choice("default", INITS, "learned step start: default (LSQ / min-max) or mse")
    group_size: int = field(
        default=32, metadata={"check": _group_size_problem, "doc": "input channels per step of per_group weights"}
    )

    def __post_init__(self) -> None:
        check_bits(self.bits)
        for name, allowed in (
            ("scheme", SCHEMES),
            ("granularity", GRANULARITIES),
            ("observer", OBSERVERS),
            ("init", INITS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        problem = _group_size_problem(self.group_size)
        if problem:
            raise ValueError(problem)
        if self.granularity == "per_group" and self.scheme == "observer":
            raise ValueError("granularity = 'per_group' needs a learned step (scheme 'lsq' or 'lsq_plus')")

    @property
    def learns_offset(self) -> bool:
        """LSQ+ : a learned zero point. ``lsq_plus`` always, ``lsq`` when asymmetric."""
        return self.scheme == "lsq_plus" or (self.scheme == "lsq" and not self.symmetric)

    @property
    def is_dynamic(self) -> bool:
        """Steps computed from each token on every forward (per_token), nothing learned or observed."""
        return self.granularity == "per_token"

    def role_problem(self, role: str) -> str | None:
        """Why this config cannot quantize a ``role`` ("weight" / "activation") tensor, or None."""
        allowed = WEIGHT_GRANULARITIES if role == "weight" else ACTIVATION_GRANULARITIES
        if self.granularity not in allowed:
            return f"granularity {self.granularity!r} is not for {role}s; use one of {allowed}"
        return None

    def with_bits(self, bits: int) -> QuantizerConfig:
        return replace(self, bits=bits)


@dataclass(frozen=True)
class QuantSpec:
    """The quantization of one layer: its weight (None for matmul) and its input activations."""

    weight: QuantizerConfig | None
    activation: QuantizerConfig
    rules: tuple[str, ...] = field(default=(), compare=False)  # which recipe rules decided it, for the summary

    @property
    def weight_bits(self) -> int:
        return self.weight.bits if self.weight is not None else 32

    @property
    def activation_bits(self) -> int:
        return self.activation.bits
