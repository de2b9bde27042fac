"""QuantSpec: what one quantizable layer gets — attached to its graph node by the annotate pass."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

SCHEMES = ("lsq", "lsq_plus", "observer")
GRANULARITIES = ("per_tensor", "per_channel")
OBSERVERS = ("minmax", "moving_average", "histogram")
INITS = ("default", "mse")
FULL_PRECISION_BITS = (16, 32)


def check_bits(bits: int, what: str = "bits") -> None:
    """Raise ValueError unless ``bits`` is 2..8, or 16/32 (meaning full precision, a pass-through)."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"{what} must be an integer, got {bits!r}")
    if not (2 <= bits <= 8 or bits in FULL_PRECISION_BITS):
        raise ValueError(f"{what} must be 2..8, or 16/32 for full precision; got {bits}")


@dataclass(frozen=True)
class QuantizerConfig:
    """How one tensor is fake-quantized.

    Example usage::

        QuantizerConfig(bits=4, scheme="lsq", granularity="per_channel", symmetric=True)
    """

    bits: int = 8
    scheme: str = "lsq"
    granularity: str = "per_tensor"
    symmetric: bool = True
    observer: str = "minmax"
    # How a learned step (and offset) starts: "default" is LSQ's 2·mean|x|/sqrt(Qp) for symmetric and the
    # batch min/max for LSQ+; "mse" the clipping range that minimises the squared quantization error (LSQ+'s
    # recommendation; at 2-bit activations min/max puts most values on the zero level).
    init: str = "default"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")

    @property
    def is_full_precision(self) -> bool:
        return self.bits in FULL_PRECISION_BITS

    @property
    def learns_offset(self) -> bool:
        """LSQ+ : a learned zero point. ``lsq_plus`` always, ``lsq`` when asymmetric."""
        return self.scheme == "lsq_plus" or (self.scheme == "lsq" and not self.symmetric)

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
