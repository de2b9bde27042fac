"""fxquant: quantization-aware training for any PyTorch model, by rewriting its torch.fx graph.

Rooms: :mod:`fxquant.config` (recipes), :mod:`fxquant.passes` (graph passes), :mod:`fxquant.quant` (the
run-time pieces a prepared graph calls), :mod:`fxquant.train`, :mod:`fxquant.search`, :mod:`fxquant.zeroshot`,
:mod:`fxquant.deploy`; the face is this module, :mod:`fxquant.cli` and :mod:`fxquant.checkpoint`.

Example usage::

    import fxquant
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4", example_inputs=torch.randn(1, 3, 32, 32))
    fxquant.summary(qmodel)
    fxquant.fit(qmodel, train_data, test_data)
    fxquant.export_onnx(qmodel, "model.onnx", torch.randn(1, 3, 32, 32))
"""

from fxquant import config, data, deploy, models, quant, search, train, zeroshot
from fxquant.api import prepare_qat
from fxquant.checkpoint import CheckpointError, load, save
from fxquant.config import Recipe, builtin_names, load_recipe
from fxquant.deploy import convert, export_onnx
from fxquant.errors import FxQuantError, PassError, PrepareError, RecipeError, TraceError
from fxquant.qat_model import PrepareReport, QATModel
from fxquant.quant import FakeQuantizer, LSQQuantizer, ObserverQuantizer, QuantizerConfig, QuantSpec, make_quantizer
from fxquant.quant.controls import disable_quant
from fxquant.quant.layers import QuantizedLayer, register_layer_type
from fxquant.summary import summary
from fxquant.train import TrainStep, evaluate
from fxquant.workflow import calibrate, fit

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FakeQuantizer",
    "FxQuantError",
    "LSQQuantizer",
    "ObserverQuantizer",
    "PassError",
    "PrepareError",
    "PrepareReport",
    "QATModel",
    "QuantSpec",
    "QuantizedLayer",
    "QuantizerConfig",
    "Recipe",
    "RecipeError",
    "TraceError",
    "TrainStep",
    "builtin_names",
    "calibrate",
    "config",
    "convert",
    "data",
    "deploy",
    "disable_quant",
    "evaluate",
    "export_onnx",
    "fit",
    "load",
    "load_recipe",
    "make_quantizer",
    "models",
    "prepare_qat",
    "quant",
    "register_layer_type",
    "save",
    "search",
    "summary",
    "train",
    "zeroshot",
]
