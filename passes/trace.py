"""Trace a model with torch.fx, falling back piece by piece where symbolic tracing cannot go.

Plain ``symbolic_trace`` fails on a whole model as soon as one forward has data-dependent control flow (a loop
over a list of images, ``if x.dim() == 4``, iteration over a dict of features...). fxquant does instead:

1. Trace; when the error is raised inside a submodule's forward, make that submodule a leaf (an opaque
   ``call_module`` node) and trace again, until the trace succeeds. The module whose forward failed is
   recorded with the error, as the reason.
2. When the failing forward is the module being traced itself, that module is opaque as a whole.
3. Every opaque module is then entered: each child is traced on its own (recursively, by the same rules)
   and, once prepared, replaces that child. So a detection model whose top-level forward loops over images
   still gets its backbone, FPN and heads quantized; only modules with nothing quantizable inside, or the
   user's ``leaf_modules``, stay whole.

The result is a set of *pieces*: graph modules, each at a module path ("" when the root itself traced).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from fxquant.errors import TraceError, closest
from fxquant.quant.attention import AttentionCore, TraceableAttention
from fxquant.quant.layers import is_quantizable_module

# Modules whose forward does not call their children (it reads their parameters directly), so tracing the
# children separately would quantize nothing that runs.
_DO_NOT_ENTER: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)
_MAX_RETRIES = 500


@dataclass
class TraceResult:
    """What tracing produced: the traced pieces and every module kept opaque, with the reason."""

    pieces: dict[str, fx.GraphModule] = field(default_factory=dict)
    opaque: dict[str, str] = field(default_factory=dict)
    user_leaves: set[str] = field(default_factory=set)  # the paths of opaque modules the user asked to keep float
    first_failure: tuple[str, BaseException] | None = None


class _FallbackTracer(fx.Tracer):
    """A tracer that treats chosen module paths and types as leaves and tags errors with the module
    whose forward raised them."""

    def __init__(self, leaf_paths: set[str], leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_paths = leaf_paths
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        # a layer fxquant quantizes is one node, whatever library defines it (transformers' Conv1D)
        return is_quantizable_module(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            # The innermost module sees the error first; outer frames keep its tag.
            if not hasattr(err, "_fxquant_module"):
                err._fxquant_module = self.path_of_module(m)
            raise


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:300]


def _reason(err: BaseException) -> str:
    """Why a module is opaque, for the report."""
    if isinstance(err, ModeDependentForward):
        return str(err)
    return f"its forward cannot be traced ({_describe(err)})"


def _has_quantizable(module: nn.Module) -> bool:
    """Holds a layer with weights, or attention whose products fxquant quantizes. An embedding (quantized only on
    a rule's request) counts only as itself: a module is not traced on its own just because it holds one — its
    forward may test optional arguments (``token_type_ids is None``), which a trace would bake in."""
    if isinstance(module, nn.Embedding):
        return True
    return any(
        (is_quantizable_module(m) and not isinstance(m, nn.Embedding))
        or isinstance(m, (AttentionCore, TraceableAttention))
        for m in module.modules()
    )


def trace_with_leaves(
    root: nn.Module,
    leaf_paths: set[str],
    leaf_types: tuple[type, ...],
    concrete_args: dict[str, Any] | None = None,
) -> tuple[fx.GraphModule, dict[str, BaseException]]:
    """Trace ``root``, turning each submodule whose forward fails into a leaf, until tracing succeeds.

    Returns the graph module and {path: error} of the submodules made leaves. Raises the original
    error, tagged ``_fxquant_module = ""``, when ``root``'s own forward cannot be traced.
    """
    leaves = set(leaf_paths)
    failed: dict[str, BaseException] = {}
    for _ in range(_MAX_RETRIES):
        tracer = _FallbackTracer(leaves, leaf_types)
        try:
            graph = tracer.trace(root, concrete_args=concrete_args)
            # A forward that branches on self.training is traced with the branch taken now (train mode) baked
            # in: trace the eval-mode forward too and treat the modules whose code differs like untraceable ones
            dependent = _mode_dependent(root, graph, leaves, leaf_types, concrete_args)
            if dependent is not None:
                raise dependent
        except Exception as err:
            path = getattr(err, "_fxquant_module", "")
            if not path or path in leaves:
                err._fxquant_module = ""
                raise
            leaves.add(path)
            failed[path] = err
            continue
        name = type(root).__name__
        return fx.GraphModule(tracer.root, graph, name), failed
    raise RuntimeError(f"gave up tracing {type(root).__name__} after {_MAX_RETRIES} fallbacks")


_CONSTANT_NUMBER = re.compile(r"_tensor_constant\d+")


class ModeDependentForward(Exception):
    """A forward computes differently in train and eval mode (it reads ``self.training``), so one trace cannot
    stand for both. Tagged with the module whose own code branches, like a tracing error."""


def _signature(graph: fx.Graph) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Each node as (op, target, constant arguments, module path of the code that made it), with other nodes
    written as ``%`` so that two traces compare by what they compute, not by node names."""

    def constants(value: Any) -> str:
        return repr(fx.node.map_arg(value, lambda _: "%"))

    rows = []
    for node in graph.nodes:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if node.op == "call_module" and stack:
            stack = stack[:-1]  # the call is made by the calling module's code, not the callee's
        owner = stack[-1][0] if stack else ""
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", str(node.target))
        if node.op == "get_attr":  # constants are numbered per trace (_tensor_constant0, then 1): not a difference
            target = _CONSTANT_NUMBER.sub("_tensor_constant", target)
        rows.append((node.op, target, constants((node.args, node.kwargs)), (owner,)))
    return rows


def _mode_dependent(
    root: nn.Module,
    train_graph: fx.Graph,
    leaves: set[str],
    leaf_types: tuple[type, ...],
    concrete_args: dict[str, Any] | None,
) -> ModeDependentForward | None:
    """None when ``root`` traces to the same graph in eval mode; else the error naming the module whose code
    differs (the root itself when its own forward branches)."""
    modes = {name: m.training for name, m in root.named_modules()}
    try:
        root.eval()
        eval_graph = _FallbackTracer(leaves, leaf_types).trace(root, concrete_args=concrete_args)
    finally:
        for name, m in root.named_modules():
            m.training = modes[name]
    train_rows, eval_rows = _signature(train_graph), _signature(eval_graph)
    if train_rows == eval_rows:
        return None
    owners: set[str] = set()
    matcher = difflib.SequenceMatcher(a=train_rows, b=eval_rows, autojunk=False)
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag != "equal":
            owners |= {row[3][0] for row in train_rows[a0:a1] + eval_rows[b0:b1]}
    known = {name for name, _ in root.named_modules()}
    owner = min((o for o in owners if o in known), key=lambda o: (o.count("."), o), default="")
    error = ModeDependentForward(
        f"{type(root.get_submodule(owner)).__name__}.forward reads self.training (train and eval mode compute "
        "differently), so it runs as written, not as a traced graph"
    )
    error._fxquant_module = owner
    return error


class _ChildrenAsLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return "." not in module_qualified_name or is_quantizable_module(m)


def _called_children(module: nn.Module) -> set[str] | None:
    """The direct children ``module``'s forward calls (None when that forward cannot be traced to find out)."""
    try:
        graph = _ChildrenAsLeaves().trace(module)
    except Exception:
        return None
    return {str(node.target).split(".")[0] for node in graph.nodes if node.op == "call_module"}


def trace_model(
    model: nn.Module,
    leaf_modules: Iterable[str | type] = (),
    concrete_args: dict[str, Any] | None = None,
) -> TraceResult:
    """Trace ``model`` into pieces (see the module docstring).

    ``leaf_modules`` holds module paths or types kept whole and in float. ``concrete_args`` applies to the
    root's forward only.

    Example usage::

        result = trace_model(torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None,
                                                                                  weights_backbone=None))
        sorted(result.pieces)   # ['backbone', 'roi_heads.box_head', ...]
    """
    leaf_paths = {m for m in leaf_modules if isinstance(m, str)}
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
    known = {name for name, _ in model.named_modules()}
    for path in leaf_paths:
        if path not in known:
            hint = closest(path, known)
            raise TraceError(
                path, KeyError(f"leaf_modules names no such module{f'; did you mean {hint!r}' if hint else ''}")
            )

    result = TraceResult()
    for path in leaf_paths:
        result.opaque[path] = "listed in leaf_modules"
        result.user_leaves.add(path)
    for name, module in model.named_modules():
        if leaf_types and isinstance(module, leaf_types) and name:
            result.opaque.setdefault(name, f"{type(module).__name__} is listed in leaf_modules")
            result.user_leaves.add(name)

    def relative(prefix: str, paths: set[str]) -> set[str]:
        if not prefix:
            return set(paths)
        return {p[len(prefix) + 1 :] for p in paths if p.startswith(prefix + ".")}

    def visit(module: nn.Module, path: str, args: dict[str, Any] | None) -> None:
        try:
            gm, failed = trace_with_leaves(module, relative(path, leaf_paths), leaf_types, args)
        except Exception as err:
            if result.first_failure is None:
                result.first_failure = (path, err)
            result.opaque[path] = _reason(err)
            enter(module, path)
            return
        result.pieces[path] = gm
        for sub, err in failed.items():
            full = f"{path}.{sub}" if path else sub
            if result.first_failure is None:
                result.first_failure = (full, err)
            result.opaque[full] = _reason(err)
            enter(module.get_submodule(sub), full)

    def enter(module: nn.Module, path: str) -> None:
        if isinstance(module, _DO_NOT_ENTER):
            return
        called = _called_children(module)
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if called is not None and name not in called:
                # its parameters are read by the opaque forward itself (F.linear(x, self.qkv.weight)): a
                # quantized copy of the child would never run
                if _has_quantizable(child):
                    result.opaque.setdefault(
                        child_path, f"its weights are used directly by {type(module).__name__}.forward, kept float"
                    )
                continue
            if child_path in leaf_paths or (leaf_types and isinstance(child, leaf_types)):
                continue
            if not _has_quantizable(child):
                continue
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # containers have no forward to trace
                enter(child, child_path)
            else:
                visit(child, child_path, None)

    visit(model, "", concrete_args)
    return result
