"""fxquant: quantization-aware training for any PyTorch model, by rewriting its torch.fx graph.

Example usage::

    import fxquant
    qmodel = fxquant.prepare_qat(model, "lsq_w4a4", example_inputs=torch.randn(1, 3, 32, 32))
    fxquant.summary(qmodel)
"""

from fxquant import checkpoint, coreset, data, distributed, models, search, train, zeroshot
from fxquant.api import PrepareReport, QATModel, disable_quant, prepare_qat
from fxquant.checkpoint import CheckpointError, load, save
from fxquant.errors import FxQuantError, PassError, PrepareError, RecipeError, TraceError
from fxquant.quantizers import FakeQuantizer, LSQQuantizer, ObserverQuantizer, make_quantizer
from fxquant.recipe import Recipe, builtin_names, load_recipe
from fxquant.spec import QuantizerConfig, QuantSpec
from fxquant.summary import summary
from fxquant.train import TrainStep, evaluate, fit

__version__ = "0.1.0.dev0"

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
    "QuantizerConfig",
    "Recipe",
    "RecipeError",
    "TraceError",
    "TrainStep",
    "builtin_names",
    "checkpoint",
    "coreset",
    "data",
    "disable_quant",
    "distributed",
    "evaluate",
    "fit",
    "load",
    "load_recipe",
    "make_quantizer",
    "models",
    "prepare_qat",
    "save",
    "search",
    "summary",
    "train",
    "zeroshot",
]
