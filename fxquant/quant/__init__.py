"""fxquant.quant: what a rewritten graph calls at run time — specs, the fake-quant kernel, quantizers,
observers, quantized layers, taps and perturbations — and the controls over them.

Nothing here imports passes, training, search or the API: the runtime stands on its own.
"""

from .controls import (
    LayerQuantizers,
    apply_bit_plan,
    check_plan_layers,
    clamp_steps,
    disable_quant,
    quantizers_of,
)
from .kernel import fake_quantize
from .layers import ConvBn, QuantizedLayer, is_quantizable_module, to_quantized, weight_channel_axis
from .quantizers import (
    DynamicQuantizer,
    FakeQuantizer,
    LSQQuantizer,
    ObserverQuantizer,
    integer_range,
    make_quantizer,
)
from .spec import FULL_PRECISION_BITS, QuantizerConfig, QuantSpec, check_bits
from .taps import FeaturePerturbation, Tap, TapStore, parse_selector

__all__ = [
    "FULL_PRECISION_BITS",
    "ConvBn",
    "DynamicQuantizer",
    "FakeQuantizer",
    "FeaturePerturbation",
    "LSQQuantizer",
    "LayerQuantizers",
    "ObserverQuantizer",
    "QuantSpec",
    "QuantizedLayer",
    "QuantizerConfig",
    "Tap",
    "TapStore",
    "apply_bit_plan",
    "check_bits",
    "check_plan_layers",
    "clamp_steps",
    "disable_quant",
    "fake_quantize",
    "integer_range",
    "is_quantizable_module",
    "make_quantizer",
    "parse_selector",
    "quantizers_of",
    "to_quantized",
    "weight_channel_axis",
]
