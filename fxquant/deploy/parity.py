"""How close an exported ONNX file runs to the converted PyTorch model, in onnxruntime.

Exact parity is impossible: onnxruntime's QuantizeLinear divides by the scale where fxquant multiplies by its
reciprocal (a value on a rounding boundary can land one level apart), and at ``ORT_ENABLE_ALL`` QDQ groups are
fused into integer kernels (QLinearConv, QLinearMatMul) that requantize with their own rounding. So the gap is
stated in *output steps*: one output step is the change of the last quantized layer's output when one of its
input elements moves by one activation level, ``s_in · max|W|``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.qat_model import GRAPH_ATTR

from .frozen import FrozenQuantizer, IntegerLayer, IntegerWeight

try:  # the ``export`` extra
    import onnxruntime
except ImportError:  # pragma: no cover - depends on the environment
    onnxruntime = None

LEVELS = ("disable_all", "enable_all")


@dataclass(frozen=True)
class Parity:
    """PyTorch vs onnxruntime on the same inputs, at one graph optimisation level."""

    level: str
    max_abs: float
    output_steps: float  # max_abs in output steps (see the module docstring); nan when the model has no step
    top1_agreement: float  # fraction of samples whose argmax agrees (classification outputs)


def output_step(deployed: nn.Module) -> float:
    """``s_in · max|W|`` of the last quantized layer of a converted model (nan when it cannot be found). When the
    model's root runs as written (opaque), the last traced piece, in module order, holds that layer."""
    if isinstance(deployed, fx.GraphModule):
        step = _last_layer_step(deployed)
        return float("nan") if step is None else step
    # grafted pieces keep their graph outside the module tree (fxquant.qat_model.graft)
    for _, module in reversed(list(deployed.named_modules())):
        if hasattr(module, GRAPH_ATTR):
            step = _last_layer_step(getattr(module, GRAPH_ATTR))
            if step is not None:
                return step
    return float("nan")


def _last_layer_step(piece: fx.GraphModule) -> float | None:
    """The last quantized layer's output step in one graph: an IntegerLayer module, or (a layer traced as its
    own piece) a linear/conv call on an IntegerWeight's output."""
    for node in reversed(list(piece.graph.nodes)):
        if node.op == "call_module" and isinstance(piece.get_submodule(node.target), IntegerLayer):
            weight = piece.get_submodule(node.target).weight()
        elif node.op == "call_function" and len(node.args) > 1 and _is_module(piece, node.args[1], IntegerWeight):
            weight = piece.get_submodule(node.args[1].target)()
        else:
            continue
        if _is_module(piece, node.args[0], FrozenQuantizer):
            quantizer = piece.get_submodule(node.args[0].target)
            return float(quantizer.scale.max()) * float(weight.abs().max())
        return None
    return None


def _is_module(piece: fx.GraphModule, arg: Any, kind: type) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "call_module" and isinstance(piece.get_submodule(arg.target), kind)


def session(path: str | Path, level: str = "enable_all", threads: int = 0) -> Any:
    """An onnxruntime CPU session at ``level`` (``disable_all`` or ``enable_all``)."""
    if onnxruntime is None:
        raise FxQuantError("checking in onnxruntime needs it: pip install 'fxquant[export]'")
    if level not in LEVELS:
        raise FxQuantError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = (
        onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        if level == "disable_all"
        else onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: Any, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    """The first output of ``sess`` on ``inputs``."""
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feed)[0]


def compare(path: str | Path, deployed: nn.Module, inputs: Any, levels: tuple[str, ...] = LEVELS) -> list[Parity]:
    """Run the file and ``deployed`` (a converted model) on ``inputs``; one :class:`Parity` per level. PyTorch runs
    on the CPU, as onnxruntime does (a model on a GPU is compared through a CPU copy: a GPU's convolutions round
    differently, which is not the export's doing).

    Example usage::

        for p in compare("w4a4.onnx", fxquant.convert(qmodel), torch.randn(32, 1, 28, 28)):
            print(p.level, p.output_steps, p.top1_agreement)
    """
    inputs = tuple(t.cpu() for t in (inputs if isinstance(inputs, tuple) else (inputs,)))
    if any(t.device.type != "cpu" for t in (*deployed.parameters(), *deployed.buffers())):
        deployed = copy.deepcopy(deployed).cpu()
    with torch.no_grad():
        reference = deployed.eval()(*inputs)
    reference = reference.numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference[0])
    step = output_step(deployed)
    results = []
    for level in levels:
        out = run(session(path, level), inputs)
        gap = float(np.abs(out - reference).max())
        agree = float((out.argmax(-1) == reference.argmax(-1)).mean()) if out.ndim >= 2 else float("nan")
        results.append(Parity(level, gap, gap / step if step == step and step > 0 else float("nan"), agree))
    return results
