"""QATModel: the model ``prepare_qat`` returns, and the report of what preparing did.

Ownership: a QATModel owns its rewritten graph, its recipe, its quantizers and its tap store. It may also hold a
*reference* to the float model (``float_model``) — outside its module tree, so the float weights never reach
``state_dict``, the optimizer, ``.to()`` or DistributedDataParallel. It holds no teacher and no loss: the
training side (:class:`fxquant.TrainStep`, :func:`fxquant.fit`) builds those from the recipe and the float model.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxquant.config import Recipe
from fxquant.errors import FxQuantError
from fxquant.passes import LayerRecord, PassRecord
from fxquant.quant.controls import LayerQuantizers, quantizers_of
from fxquant.quant.quantizers import FakeQuantizer
from fxquant.quant.taps import TapStore

# Where a grafted piece keeps its graph module (see fxquant.api): an attribute outside the module tree.
GRAPH_ATTR = "_fxquant_graph"


def graft(original: nn.Module, gm: fx.GraphModule) -> None:
    """Make ``original`` run the prepared graph ``gm`` while staying an instance of its own class.

    Replacing a submodule by a GraphModule would lose the methods its parent may call on it (RetinaNet
    calls ``head.compute_loss``). Instead, every module and attribute the graph reads is registered on
    ``original`` at the same path (quantized layers, new quantizers), and the generated forward is bound to
    ``original``. The graph module stays reachable for inspection, outside the module tree.
    """
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        *parents, name = str(node.target).split(".")
        owner, source = original, gm
        for part in parents:
            owner, source = getattr(owner, part), getattr(source, part)
        value = getattr(source, name)
        if getattr(owner, name, None) is not value:
            setattr(owner, name, value)
    original.forward = types.MethodType(type(gm).forward, original)
    object.__setattr__(original, GRAPH_ATTR, gm)  # not a child: no duplicate state_dict keys


@dataclass
class PrepareReport:
    """What prepare_qat did: traced pieces, opaque modules and why, quantized layers, passes run."""

    pieces: list[str]
    opaque: dict[str, str]
    layers: list[LayerRecord]
    passes: list[PassRecord]
    notes: list[str] = field(default_factory=list)
    costs: dict[str, Any] | None = None  # layer name -> fxquant.search.cost.LayerCost, with example inputs
    # every layer with weights that stays float, and why (opaque code, an unsupported type, leaf_modules)
    float_layers: dict[str, str] = field(default_factory=dict)
    # modules captured by module swap rather than by the traced graph, and how (attention rewritten as traceable
    # ops; a layer inside code that cannot be traced quantized on its own)
    swapped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PrepareOptions:
    """How prepare_qat was called besides the recipe, so that ``fxquant.load`` can prepare the same way."""

    leaf_modules: tuple[str, ...] = ()
    concrete_args: Mapping[str, Any] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict) -> object:
        return self  # frozen and read-only


class _Outside:
    """Holds a module without making it a child of the module that holds this."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module | None):
        self.module = module


class QATModel(nn.Module):
    """A model prepared for quantization-aware training. Call it like the original model.

    Attributes: ``model`` (the rewritten model), ``recipe``, ``report``, ``taps`` (the tap store),
    ``options`` (how it was prepared), ``bit_plan`` (per-layer widths in force when they came from a plan or a
    search, else None), ``float_model`` (the float model, or None).

    Example usage::

        qmodel = fxquant.prepare_qat(model, "lsq_w4a4")
        qmodel.load_float_state_dict(torch.load("fp.pt"))
    """

    model: nn.Module
    recipe: Recipe
    report: PrepareReport
    taps: TapStore
    options: PrepareOptions
    bit_plan: dict[str, tuple[int | None, int | None]] | None

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        report: PrepareReport,
        taps: TapStore,
        options: PrepareOptions,
        float_keys: Mapping[str, str],
        float_model: nn.Module | None = None,
    ):
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.report = report
        self.taps = taps
        self.options = options
        self.bit_plan = dict(recipe.bit_plan) if recipe.bit_plan is not None else None
        self._float_keys = dict(float_keys)  # float state_dict key -> key in this model's state_dict
        self._float = _Outside(float_model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():
            self._check_input_devices(args)
        return self.model(*args, **kwargs)

    def _check_input_devices(self, args: tuple[Any, ...]) -> None:
        """A clear error for the common slip of feeding a batch that is not where the model is (instead of torch's
        "Expected all tensors to be on the same device" from deep inside the graph)."""
        probe = next(self.model.parameters(), None)
        if probe is None:
            return
        for i, arg in enumerate(args):
            if isinstance(arg, torch.Tensor) and arg.dim() > 0 and arg.device != probe.device:  # 0-dim CPU: fine
                raise FxQuantError(
                    f"the model is on {probe.device} but its input {i} is on {arg.device}: move the batch there "
                    f"(x.to({str(probe.device)!r})); fxquant.fit, TrainStep, calibrate and evaluate move batches "
                    "to the model's device themselves"
                )

    # -- the float model ----------------------------------------------------------------------------------------
    @property
    def float_model(self) -> nn.Module | None:
        """The float model the recipe's distillation, coreset scores or zero-shot generator read (or None)."""
        return self._float.module

    def keep_float_model(self, module: nn.Module | None) -> None:
        """Refer to ``module`` as the float model (None forgets it). A reference outside the module tree:
        ``qmodel.float_model = m`` would make ``m`` a child module (nn.Module's rule), hence this method."""
        self._float.module = module

    def float_key_map(self) -> dict[str, str]:
        """Float ``state_dict`` key → this model's key (``conv1.weight`` → ``model.conv1.weight``; with
        ``bn = "fold"``, ``bn1.weight`` → ``model.conv1.bn.weight``)."""
        return dict(self._float_keys)

    def load_float_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load a float model's ``state_dict`` (keys of the original architecture) into the prepared model.
        Quantizer state is left as it is. With ``strict``, every float key must be given and known.

        Example usage::

            qmodel = fxquant.prepare_qat(resnet20(), "lsq_w4a4")
            qmodel.load_float_state_dict(torch.load("resnet20_fp.pt", weights_only=True))
        """
        unknown = [k for k in state_dict if k not in self._float_keys]
        missing = [k for k in self._float_keys if k not in state_dict]
        if strict and (unknown or missing):
            raise FxQuantError(
                "the float state_dict does not fit this model's architecture: "
                + (f"unexpected keys {unknown[:5]}" if unknown else "")
                + ("; " if unknown and missing else "")
                + (f"missing keys {missing[:5]}" if missing else "")
            )
        translated = {self._float_keys[k]: v for k, v in state_dict.items() if k in self._float_keys}
        own = self.state_dict(keep_vars=True)
        for key, value in translated.items():
            if own[key].shape != value.shape:
                raise FxQuantError(
                    f"float state_dict key {key!r}: shape {tuple(value.shape)}, model {tuple(own[key].shape)}"
                )
        self.load_state_dict(translated, strict=False)

    # -- structure ----------------------------------------------------------------------------------------------
    @property
    def graph_module(self) -> fx.GraphModule | None:
        """The traced root (None when the model's own forward could not be traced and only its children were)."""
        return self.model if isinstance(self.model, fx.GraphModule) else None

    def graph_modules(self) -> dict[str, fx.GraphModule]:
        """Every traced piece by module path ("" is the root)."""
        return {
            path: getattr(self.model.get_submodule(path), GRAPH_ATTR) if path else self.model
            for path in self.report.pieces
        }

    def quantizers(self) -> dict[str, FakeQuantizer]:
        """Every quantizer of the model by module path."""
        return quantizers_of(self.model)

    def layer_quantizers(self, layer: LayerRecord) -> tuple[FakeQuantizer | None, list[FakeQuantizer]]:
        """(weight quantizer, activation quantizers) of one quantized layer."""
        piece = self.graph_modules()[layer.piece]
        weight = piece.get_submodule(layer.weight_quantizer) if layer.weight_quantizer else None
        return weight, [piece.get_submodule(p) for p in layer.activation_quantizers]

    def plan_targets(self) -> list[LayerQuantizers]:
        """Each quantized layer with its quantizers, for :func:`fxquant.quant.apply_bit_plan`."""
        targets = []
        for record in self.report.layers:
            weight, activations = self.layer_quantizers(record)
            targets.append(LayerQuantizers(record.name, weight, tuple(activations)))
        return targets
