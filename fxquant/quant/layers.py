"""Quantized layers: the modules a rewritten graph calls in place of conv / linear / conv-transpose.

Each is a subclass of the float layer it replaces, sharing its parameters, so that ``state_dict`` keys stay
those of the float model (``conv1.weight``) plus the quantizer's (``conv1.weight_quantizer.scale``): a float
checkpoint loads into a prepared model with ``strict=False``. The weight goes through
``self.weight_quantizer`` on every forward; activations are quantized by separate graph nodes.

:class:`ConvBn` is the QAT form of a conv followed by batch norm (``bn = "fold"`` in a recipe): the weight
is quantized *folded* (w·γ/σ, as it will be deployed) while the batch norm still normalises with batch
statistics and updates its running statistics during training (Jacob et al. 2018, as torch.ao does).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.quant.quantizers import FakeQuantizer


class QuantizedLayer:
    """Marker and shared behaviour of layers whose weight is fake-quantized."""

    weight_quantizer: FakeQuantizer
    float_name: str | None = None  # the float type's name when it is not the class name without "Quant"
    weight_axis: int = 0  # the output-channel axis of the weight

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)


class QuantConv1d(QuantizedLayer, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv2d(QuantizedLayer, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConv3d(QuantizedLayer, nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(QuantizedLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantEmbedding(QuantizedLayer, nn.Embedding):
    """An embedding table with its weight quantized (weight-only: the input is indices), one step per row
    under per_channel. fxquant quantizes embeddings only where a recipe rule selects them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            x,
            self.quantized_weight(),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


class _QuantConvTransposeNd(QuantizedLayer):
    _functional = None
    _spatial_dims = 0
    weight_axis = 1  # (in, out / groups, *kernel)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, self._spatial_dims, self.dilation
        )
        return type(self)._functional(
            x,
            self.quantized_weight(),
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )


class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    _functional = F.conv_transpose1d
    _spatial_dims = 1


class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    _functional = F.conv_transpose2d
    _spatial_dims = 2


class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    _functional = F.conv_transpose3d
    _spatial_dims = 3


class QuantTransposedLinear(QuantizedLayer, nn.Module):
    """Hugging Face ``transformers``' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out).

    Built by :func:`to_quantized` from a ``Conv1D`` (its ``weight``, ``bias`` and ``nf`` are shared); computes
    ``addmm`` exactly as ``Conv1D`` does, with the weight quantized per output channel (axis 1).
    """

    float_name = "Conv1D"
    weight_axis = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.quantized_weight())
        return x.view(size_out)


class ConvBn(QuantizedLayer, nn.Module):
    """Conv followed by batch norm, trained with the folded weight quantized.

    Example usage::

        fused = ConvBn(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        fused.weight_quantizer = make_quantizer(QuantizerConfig(bits=4), "weight", ch_axis=0)
    """

    def __init__(self, conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.weight_quantizer = nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def _bn_scale(self) -> torch.Tensor:
        """γ/σ per output channel, from the running variance (what deployment will fold in)."""
        std = torch.sqrt(self.bn.running_var + self.bn.eps)
        gamma = self.bn.weight if self.bn.affine else torch.ones_like(std)
        return gamma / std

    def folded_weight(self) -> torch.Tensor:
        scale = self._bn_scale()
        return self.conv.weight * scale.reshape(-1, *([1] * (self.conv.weight.dim() - 1)))

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.folded_weight())

    def folded_bias(self) -> torch.Tensor:
        """β + (b − μ)·γ/σ: the bias of the folded conv (what deployment uses)."""
        scale = self._bn_scale()
        beta = self.bn.bias if self.bn.affine else torch.zeros_like(scale)
        bias = self.conv.bias if self.conv.bias is not None else torch.zeros_like(scale)
        return beta + (bias - self.bn.running_mean) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # exactly the deployed conv: folded, quantized weight and folded bias
            return self.conv._conv_forward(x, self.quantized_weight(), self.folded_bias())
        scale = self._bn_scale()
        y = self.conv._conv_forward(x, self.quantized_weight(), None)
        shape = (1, -1) + (1,) * (y.dim() - 2)
        # Undo the fold so that batch norm sees the unfolded conv output and normalises with batch statistics
        # (and updates the running ones); in eval the folded form above is used.
        y = y / scale.reshape(shape)
        if self.conv.bias is not None:
            y = y + self.conv.bias.reshape(shape)
        return self.bn(y)


QUANTIZED_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.Linear: QuantLinear,
    nn.Embedding: QuantEmbedding,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
}
# Linear subclasses torch uses internally that behave exactly like Linear.
QUANTIZED_CLASS[nn.modules.linear.NonDynamicallyQuantizableLinear] = QuantLinear


# Layer types users add with register_layer_type (an explicit call, never an import side effect).
_REGISTERED: dict[type[nn.Module], type[nn.Module]] = {}


def register_layer_type(float_cls: type[nn.Module], quantized_cls: type[nn.Module]) -> None:
    """Teach fxquant to quantize ``float_cls`` layers: they become ``quantized_cls``, which must subclass
    :class:`QuantizedLayer` and compute with ``self.quantized_weight()``; it receives the float layer's
    attributes and parameters (``state_dict`` keys stay the same). Set ``weight_axis`` on it when the output
    channels are not the weight's first axis.

    Example usage::

        class QuantMyLinear(QuantizedLayer, MyLinear):
            def forward(self, x):
                return my_linear(x, self.quantized_weight(), self.bias)

        fxquant.register_layer_type(MyLinear, QuantMyLinear)
    """
    if not (isinstance(float_cls, type) and issubclass(float_cls, nn.Module)):
        raise TypeError(f"register_layer_type: {float_cls!r} is not an nn.Module class")
    if not (isinstance(quantized_cls, type) and issubclass(quantized_cls, QuantizedLayer)):
        raise TypeError(f"register_layer_type: {quantized_cls!r} must subclass fxquant.quant.QuantizedLayer")
    _REGISTERED[float_cls] = quantized_cls


def _transformers_conv1d() -> type | None:
    """transformers' Conv1D class when transformers is already imported (a model using it is), else None."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def quantized_class(module: nn.Module) -> type[nn.Module] | None:
    """The quantized class for a float layer, or None when fxquant has none."""
    cls = QUANTIZED_CLASS.get(type(module)) or _REGISTERED.get(type(module))
    if cls is None and type(module) is _transformers_conv1d():
        cls = QuantTransposedLinear
    return cls


def weight_channel_axis(module: nn.Module) -> int:
    """The output-channel axis of a layer's weight: 1 for transposed convolutions and ``Conv1D``, else 0."""
    layer = module.conv if isinstance(module, ConvBn) else module
    cls = type(layer) if isinstance(layer, QuantizedLayer) else quantized_class(layer)
    return cls.weight_axis if cls is not None else 0


def is_quantizable_module(module: nn.Module) -> bool:
    """A float layer fxquant knows how to quantize, or one already quantized."""
    return quantized_class(module) is not None or isinstance(module, (QuantizedLayer, ConvBn))


def to_quantized(module: nn.Module, weight_quantizer: FakeQuantizer) -> nn.Module:
    """The quantized form of ``module``, sharing its parameters, buffers and attributes.

    ``module`` itself is left as it was; the caller swaps the result in.
    """
    if isinstance(module, QuantizedLayer):
        return module
    cls = quantized_class(module)
    if cls is None:
        raise TypeError(f"fxquant cannot quantize a {type(module).__name__}")
    quantized = rebuilt_as(module, cls)
    quantized.weight_quantizer = weight_quantizer
    return quantized


def rebuilt_as(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` instance holding ``module``'s parameters, buffers, children and attributes (containers copied,
    tensors shared): the same module with another forward (quantized layers, traceable attention). ``module``
    is left as it was."""
    swapped = cls.__new__(cls)
    state = dict(vars(module))
    for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        state[name] = type(state[name])(state[name])
    swapped.__dict__.update(state)
    return swapped
