"""The modules of a converted model: quantizers with frozen constants, and layers whose weights are integers.

Each records what an exporter needs (``bits``, ``qmin``/``qmax``, ``axis``, scale and zero point); their state is
buffers only, the weights integer (:func:`fxquant.deploy.ops.pack`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.errors import FxQuantError
from fxquant.quant.kernel import MIN_STEP
from fxquant.quant.layers import ConvBn, QuantizedLayer
from fxquant.quant.quantizers import FakeQuantizer, LSQQuantizer, ObserverQuantizer

from . import ops


def quantizer_constants(q: FakeQuantizer, name: str) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """(scale, zero point or None, qmin, qmax) a quantizer applies now, as its forward would in eval mode: the
    learned step (clamped as the forward clamps it), the zero point rounded and clamped into the range."""
    if not q.is_initialized or q.signed is None:
        raise FxQuantError(
            f"quantizer {name} was never initialised (no batch went through it): run fxquant.calibrate(qmodel, x) "
            "or train before converting"
        )
    qmin, qmax = q.qrange()
    if isinstance(q, LSQQuantizer):
        scale = q._step().detach().clamp(min=MIN_STEP).clone()
        zero_point = q.zero_point.detach() if q.learn_offset else None
    elif isinstance(q, ObserverQuantizer):
        scale, zero_point = q.scale.detach().clone(), q.zero_point.detach().float()
    else:
        raise FxQuantError(f"quantizer {name}: fxquant cannot convert a {type(q).__name__}")
    if zero_point is not None:
        zero_point = zero_point.round().clamp(qmin, qmax).clone()
    return scale.float(), zero_point, qmin, qmax


class FrozenQuantizer(nn.Module):
    """An activation quantizer with constant scale and zero point (``fxquant::quantize_dequantize``)."""

    def __init__(self, q: FakeQuantizer, name: str):
        super().__init__()
        scale, zero_point, self.qmin, self.qmax = quantizer_constants(q, name)
        self.bits = q.bits
        self.axis = -1 if q.ch_axis is None else q.ch_axis
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxquant.quantize_dequantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range=[{self.qmin}, {self.qmax}], axis={self.axis}"


class IntegerWeight(nn.Module):
    """A weight stored as integers with its scale, zero point, width and channel axis; calling it returns the
    dequantized weight (``fxquant::dequantize_weight``)."""

    def __init__(self, weight: torch.Tensor, q: FakeQuantizer, name: str):
        super().__init__()
        scale, zero_point, self.qmin, self.qmax = quantizer_constants(q, name)
        self.bits = q.bits
        self.axis = -1 if q.ch_axis is None else q.ch_axis
        self.shape = list(weight.shape)
        with torch.no_grad():
            s = ops._broadcast(scale, weight.dim(), self.axis)  # float32, as the training kernels compute
            integers = torch.mul(weight.detach().float(), 1.0 / s).round_()
            if zero_point is not None:
                integers.add_(ops._broadcast(zero_point, weight.dim(), self.axis))
            integers.clamp_(self.qmin, self.qmax)
        self.register_buffer("stored", ops.pack(integers.to(torch.int16), self.bits, self.qmin < 0))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def integers(self) -> torch.Tensor:
        """The weight's integer values (in the weight's shape)."""
        return ops.unpack(self.stored, self.bits, self.signed, self.shape)

    def forward(self) -> torch.Tensor:
        return torch.ops.fxquant.dequantize_weight(
            self.stored, self.scale, self.zero_point, self.axis, self.bits, self.signed, self.shape
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, shape={self.shape}, axis={self.axis}, stored={self.stored.dtype}"


class IntegerLayer(nn.Module):
    """A conv / linear / conv-transpose whose weight is an :class:`IntegerWeight`; the float layer's other
    settings (stride, padding, groups...) are kept on ``layer``, a weightless copy of it."""

    def __init__(self, layer: nn.Module, weight: IntegerWeight, bias: torch.Tensor | None):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # settings only: not a child (no state, no repr of its own)
        self.weight = weight
        if bias is None:
            self.bias = None
        else:
            self.register_buffer("bias", bias.detach().clone())

    @classmethod
    def from_quantized(cls, module: nn.Module, name: str) -> IntegerLayer:
        """The deployed form of a prepared quantized layer (a folded ``ConvBn`` becomes a conv with a bias)."""
        if isinstance(module, ConvBn):
            with torch.no_grad():
                weight, bias, layer = module.folded_weight(), module.folded_bias(), module.conv
        elif isinstance(module, QuantizedLayer):
            weight, bias, layer = module.weight, module.bias, module
        else:
            raise FxQuantError(f"{name}: fxquant cannot convert a {type(module).__name__}")
        q = module.weight_quantizer
        if not isinstance(q, FakeQuantizer):
            raise FxQuantError(f"{name}: the layer has no weight quantizer")
        shell = _weightless(layer)
        return cls(shell, IntegerWeight(weight, q, f"{name}.weight_quantizer"), bias)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        w = self.weight()
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, w, self.bias)
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            dims = len(layer.kernel_size)
            output_padding = layer._output_padding(
                x, output_size, layer.stride, layer.padding, layer.kernel_size, dims, layer.dilation
            )
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
            return fn(x, w, self.bias, layer.stride, layer.padding, output_padding, layer.groups, layer.dilation)
        return layer._conv_forward(x, w, self.bias)

    def extra_repr(self) -> str:
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return f"Linear({layer.in_features}, {layer.out_features})"
        return f"{type(layer).__name__}({layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size})"


def float_layer(module: nn.Module) -> nn.Module:
    """The float layer a prepared layer computes when its weight quantizer is off (or at 16/32 bits): the same
    class without the quantizer, with the (folded, for ``ConvBn``) weight and bias as parameters."""
    with torch.no_grad():
        if isinstance(module, ConvBn):
            layer = _weightless(module.conv)
            layer._parameters = {
                "weight": nn.Parameter(module.folded_weight().detach().clone(), requires_grad=False),
                "bias": nn.Parameter(module.folded_bias().detach().clone(), requires_grad=False),
            }
            return layer
        layer = _weightless(module)
        layer._parameters = dict(module._parameters)
        return layer


def is_float(module: nn.Module) -> bool:
    """A prepared layer whose weight quantizer is off or at full precision."""
    q = getattr(module, "weight_quantizer", None)
    return isinstance(q, FakeQuantizer) and not q.is_active


def _weightless(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` (as its float class) without parameters: only its settings are read."""
    float_class = next((c for c in type(layer).__mro__ if c.__module__.startswith("torch.nn")), type(layer))
    shell = float_class.__new__(float_class)
    shell.__dict__ = copy.copy(layer.__dict__)
    shell._parameters = {}
    shell._buffers = {}
    shell._modules = {}
    return shell
