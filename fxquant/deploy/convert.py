"""``convert``: a prepared (trained) model becomes a frozen inference model.

Quantizer state becomes constants (no ``bool(buffer)`` branch, no in-place update, no first-batch
initialisation): activation quantizers become :class:`~fxquant.deploy.frozen.FrozenQuantizer`, quantized layers
:class:`~fxquant.deploy.frozen.IntegerLayer` with integer weights computed from the *learned* steps, folded
``ConvBn`` a conv with a bias; taps, perturbations and disabled quantizers vanish (a layer whose weight quantizer
is off or at 16/32 bits becomes its plain float layer); an activation function fused into a quantizer
(``passes.fuse_activations``) is written back as its own op before it (``torch.relu`` or ``torch.clamp``, which
exporters know). In eval mode the result computes exactly what the prepared model computes.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.qat_model import GRAPH_ATTR, QATModel, graft
from fxquant.quant.layers import ConvBn, QuantizedLayer
from fxquant.quant.quantizers import FakeQuantizer
from fxquant.quant.taps import FeaturePerturbation, Tap

from .frozen import FrozenQuantizer, IntegerLayer, IntegerWeight, float_layer, is_float


def convert(qmodel: QATModel) -> nn.Module:
    """The deployable form of ``qmodel`` (which is left as it is), in eval mode.

    Raises FxQuantError naming the module for what cannot be converted (a quantizer never initialised, a quantized
    layer whose weight quantizer is off).

    Example usage::

        deployed = fxquant.convert(qmodel)
        torch.save(deployed.state_dict(), "w4a4.pt")        # integer weights; loads with weights_only=True
        exported = torch.export.export(deployed, (x,))
    """
    if not isinstance(qmodel, QATModel):
        raise FxQuantError(f"fxquant.convert expects the QATModel prepare_qat returned, got {type(qmodel).__name__}")
    twin = copy.deepcopy(qmodel, {id(qmodel.float_model): None})
    twin.taps.clear()
    model = twin.model
    for path in twin.report.pieces:
        if path:
            owner = model.get_submodule(path)
            gm = getattr(owner, GRAPH_ATTR)
            _freeze_graph(gm, path)
            _drop_stale(owner, gm)
            graft(owner, gm)
        else:
            _freeze_graph(model, "")
    leftovers = [n for n, m in model.named_modules() if isinstance(m, (FakeQuantizer, QuantizedLayer, ConvBn))]
    if leftovers:
        raise FxQuantError(
            f"module {leftovers[0]} is still a training module after conversion: it is called from code fxquant "
            "could not trace (an opaque module), so it cannot be frozen. List its owner in leaf_modules to keep "
            "it float, or make its forward traceable"
        )
    return model.eval()


def _qualified(piece: str, target: str) -> str:
    return f"{piece}.{target}" if piece else target


def _unfuse_activations(gm: fx.GraphModule) -> None:
    """Give each quantizer's fused input clamp back its own node: ``relu`` for (0, inf), else ``clamp``."""
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, FakeQuantizer) or module.input_clamp is None:
            continue
        low, high = module.input_clamp
        source = node.args[0]
        with gm.graph.inserting_before(node):
            if (low, high) == (0.0, math.inf):
                clamped = gm.graph.call_function(torch.relu, (source,))
            else:
                clamped = gm.graph.call_function(torch.clamp, (source, low, None if math.isinf(high) else high))
        node.replace_input_with(source, clamped)
        module.input_clamp = None


def _freeze_graph(gm: fx.GraphModule, piece: str) -> None:
    """Rewrite one prepared graph in place (see the module docstring)."""
    graph = gm.graph
    _unfuse_activations(gm)
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        name = _qualified(piece, str(node.target))
        if isinstance(module, (Tap, FeaturePerturbation)) or (
            isinstance(module, FakeQuantizer) and not module.is_active
        ):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif isinstance(module, FakeQuantizer) and module.role == "weight":
            source = node.args[0]
            if not (isinstance(source, fx.Node) and source.op == "get_attr"):
                raise FxQuantError(f"{name}: a weight quantizer whose input is not a stored weight")
            gm.add_submodule(str(node.target), IntegerWeight(_attr(gm, str(source.target)), module, name))
            node.args = ()
            if not source.users:
                graph.erase_node(source)
        elif isinstance(module, FakeQuantizer):
            gm.add_submodule(str(node.target), FrozenQuantizer(module, name))
        elif isinstance(module, (QuantizedLayer, ConvBn)) and is_float(module):
            gm.add_submodule(str(node.target), float_layer(module))  # kept float by the recipe or by the user
        elif isinstance(module, (QuantizedLayer, ConvBn)):
            gm.add_submodule(str(node.target), IntegerLayer.from_quantized(module, name))
    graph.lint()
    gm.delete_all_unused_submodules()
    _delete_unused_attributes(gm)
    gm.recompile()


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _delete_unused_attributes(gm: fx.GraphModule) -> None:
    """Float weights that only the weight quantizers read are gone from the graph: drop them from the module
    too, so that no float copy of a quantized weight stays in the state_dict."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()):
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path)
        if (
            name not in used
            and not isinstance(owner, (IntegerLayer, IntegerWeight))
            and not _called_by_graph(gm, owner_path)
        ):
            delattr(owner, attr)


def _called_by_graph(gm: fx.GraphModule, path: str) -> bool:
    """Whether module ``path`` (or one inside it) is called by the graph; such a module reads its own
    parameters (e.g. a batch norm), which must stay."""
    if not path:
        return False
    return any(
        n.op == "call_module"
        and (str(n.target) == path or str(n.target).startswith(path + ".") or path.startswith(str(n.target) + "."))
        for n in gm.graph.nodes
    )


def _drop_stale(owner: nn.Module, gm: fx.GraphModule) -> None:
    """A grafted piece registered its graph's modules on ``owner``; those the frozen graph no longer calls
    (taps, perturbations, disabled quantizers) are removed from ``owner`` too."""
    current = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for name, module in list(owner.named_children()):
        if isinstance(module, (Tap, FeaturePerturbation, FakeQuantizer)) and name not in current:
            delattr(owner, name)
