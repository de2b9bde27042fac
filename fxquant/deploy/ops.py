"""The two operators a converted model calls, as ``torch.library`` custom ops so that ``torch.export`` and the
ONNX exporter see them whole (and translate them to QuantizeLinear/DequantizeLinear, see :mod:`.onnx_export`):

* ``fxquant::quantize_dequantize(x, scale, zero_point, qmin, qmax, axis)`` — an activation's fake quantization
  with frozen constants: ``(clamp(round(x·(1/s)) + z, qmin, qmax) − z)·s``, computed by the training kernels'
  reference (:mod:`fxquant.quant.reference`: float32 arithmetic, the result in x's dtype), so a converted model
  equals the prepared one bit for bit;
* ``fxquant::dequantize_weight(q, scale, zero_point, axis, bits, shape)`` — integer weights (``int8``, or two per
  byte in a ``uint8`` at ≤ 4 bits, low nibble first as ONNX packs INT4) to floats: ``(q − z)·s``.

``axis`` −1 means per tensor.
"""

from __future__ import annotations

import torch

from fxquant.quant import reference
from fxquant.quant.grid import in_layout_of

PACKED_BITS = 4  # at this width and below, two values share a byte


def _broadcast(t: torch.Tensor, dims: int, axis: int) -> torch.Tensor:
    if axis < 0:
        return t.reshape([1] * dims) if t.numel() == 1 else t
    shape = [1] * dims
    shape[axis] = -1
    return t.reshape(shape)


@torch.library.custom_op("fxquant::quantize_dequantize", mutates_args=())
def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int, qmax: int, axis: int
) -> torch.Tensor:
    moved = axis > 0 and x.dim() > 1  # the reference takes its steps along dim 0
    xs = x.movedim(axis, 0) if moved else x
    y = reference.forward(xs, scale, zero_point, qmin, qmax)
    return in_layout_of(y.movedim(0, axis) if moved else y, x)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, qmin, qmax, axis):
    return torch.empty_like(x)


def pack(q: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Integer values (any integer dtype, inside ``bits``' range) as stored: ``int8`` (``uint8`` when unsigned),
    or at ≤ 4 bits a flat ``uint8`` of nibbles, element 2i in the low nibble of byte i (two's complement for
    negative values).

    Example usage::

        pack(torch.tensor([-8, 7, 1]), 4)       # tensor([0x78, 0x01], dtype=torch.uint8)
    """
    flat = q.reshape(-1).to(torch.int16)
    if bits > PACKED_BITS:
        return flat.to(torch.int8 if signed else torch.uint8).reshape(q.shape)
    nibbles = (flat & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack(stored: torch.Tensor, bits: int, signed: bool, shape: list[int]) -> torch.Tensor:
    """The integer values :func:`pack` stored, as ``int8`` (``uint8`` above 4 bits unsigned) of ``shape``."""
    if bits > PACKED_BITS:
        return stored.reshape(shape)
    count = 1
    for size in shape:
        count *= size
    low, high = stored & 0xF, stored >> 4
    nibbles = torch.stack([low, high], dim=1).reshape(-1)[:count].to(torch.int8)
    if signed:
        nibbles = (nibbles ^ 8) - 8  # sign-extend the 4-bit two's complement
    return nibbles.reshape(shape)


@torch.library.custom_op("fxquant::dequantize_weight", mutates_args=())
def dequantize_weight(
    stored: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    axis: int,
    bits: int,
    signed: bool,
    shape: list[int],
) -> torch.Tensor:
    q = unpack(stored, bits, signed, shape).to(scale.dtype)
    if zero_point is not None:
        q = q.sub_(_broadcast(zero_point, len(shape), axis).to(scale.dtype))
    return q.mul_(_broadcast(scale, len(shape), axis))


@dequantize_weight.register_fake
def _(stored, scale, zero_point, axis, bits, signed, shape):
    return scale.new_empty(shape)
