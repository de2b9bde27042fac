"""fxquant.deploy: from a trained QAT model to what ships — ``convert`` (a frozen model with integer weights,
capturable by ``torch.export``) and ``export_onnx`` (QDQ ONNX at every width from 2 to 8 bits, checked in
onnxruntime). The ONNX side needs the ``export`` extra (``pip install fxquant[export]``); it is imported when used.
"""

from .convert import convert
from .frozen import FrozenQuantizer, IntegerLayer, IntegerWeight
from .onnx_export import ExportReport, export_onnx
from .parity import Parity, compare

__all__ = [
    "ExportReport",
    "FrozenQuantizer",
    "IntegerLayer",
    "IntegerWeight",
    "Parity",
    "compare",
    "convert",
    "export_onnx",
]
