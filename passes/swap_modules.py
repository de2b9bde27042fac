"""swap_modules: before tracing, replace attention modules whose products a trace cannot see.

* ``nn.MultiheadAttention`` → :class:`~fxquant.quant.attention.QuantizableMultiheadAttention`;
* torchvision's ``ShiftedWindowAttention`` (V1, V2) → :mod:`fxquant.quant.swin`'s traceable forms, and MaxViT's
  ``RelativePositionalMultiHeadAttention`` → :mod:`fxquant.quant.maxvit`'s;
* Hugging Face attention modules get an ``fxquant_attention`` core child, and their configs the ``fxquant``
  attention implementation (registered with ``transformers`` here, once, when such a model is prepared).

Each replacement keeps its parameters, buffers and ``state_dict`` keys and is still an instance of the class it
replaces. This works on the nn.Module (it runs before there is a graph), so it is not a graph pass; it records
what it did for the report: ``{module path: what replaced it}`` and ``{module path: why it was left alone}``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from torch import nn

from fxquant.quant import hf
from fxquant.quant.attention import QuantizableMultiheadAttention, TraceableAttention
from fxquant.quant.maxvit import TRACEABLE_MAXVIT
from fxquant.quant.swin import TRACEABLE_SWIN


@dataclass
class SwapResult:
    model: nn.Module  # the model, or its replacement when the model itself was swapped
    swapped: dict[str, str] = field(default_factory=dict)  # path → how it is captured now
    kept: dict[str, str] = field(default_factory=dict)  # path → why it was not swapped
    # path → the attention type it stands for ("MultiheadAttention", "LlamaAttention"): recipe rules select the
    # layers and products inside by that type
    scopes: dict[str, str] = field(default_factory=dict)


def _replacement(module: nn.Module) -> tuple[nn.Module | None, str]:
    """(the traceable module, what was done) or (None, why not) for one module; (None, "") when n/a."""
    if isinstance(module, TraceableAttention):
        return None, ""
    if type(module) is nn.MultiheadAttention:
        problem = QuantizableMultiheadAttention.unsupported(module)
        if problem:
            return None, problem
        return QuantizableMultiheadAttention.from_float(module), "MultiheadAttention rewritten as traceable ops"
    cls = TRACEABLE_SWIN.get(type(module)) or TRACEABLE_MAXVIT.get(type(module))
    if cls is not None:
        return cls.from_float(module), f"{type(module).__name__} rewritten as traceable ops"
    return None, ""


def _register_hf_implementation() -> bool:
    """Register fxquant's attention function and its (eager, additive) masks with the loaded ``transformers``."""
    modeling = sys.modules.get("transformers.modeling_utils")
    masking = sys.modules.get("transformers.masking_utils")
    if modeling is None or masking is None:
        return False
    modeling.AttentionInterface.register(hf.IMPLEMENTATION, hf.attention_forward)
    masking.AttentionMaskInterface.register(hf.IMPLEMENTATION, masking.eager_mask)
    return True


def swap_modules(model: nn.Module, keep: frozenset[str] = frozenset(), keep_types: tuple[type, ...] = ()) -> SwapResult:
    """Swap, in place, every attention module of ``model`` (except those at or under a path in ``keep``, or of a
    type in ``keep_types``) for its traceable form. Returns the model (a new object only when ``model`` itself
    was swapped), what was swapped and what was left alone, by module path.

    Example usage::

        result = swap_modules(torchvision.models.vit_b_16())
        sorted(result.swapped)[:1]   # ['encoder.layers.encoder_layer_0.self_attention']
    """

    def kept(path: str, module: nn.Module) -> bool:
        return any(path == k or path.startswith(f"{k}.") for k in keep) or isinstance(module, keep_types)

    result = SwapResult(model)
    if not kept("", model):
        replacement, what = _replacement(model)
        if replacement is not None:
            result.model, result.swapped[""] = replacement, what
            result.scopes[""] = type(model).__name__
        elif what:
            result.kept[""] = what
    model = result.model
    configs = []
    for path, module in list(model.named_modules()):
        if kept(path, module):
            continue
        if hf.is_hf_attention(module) and not hasattr(module, hf.CORE_NAME):
            if not _register_hf_implementation():
                result.kept[path] = "transformers is not fully loaded; attention left as it is"
                continue
            hf.attach_core(module)
            configs.append(module.config)
            result.scopes[path] = type(module).__name__
            result.swapped[path] = f"{type(module).__name__}: attention products computed by {hf.CORE_NAME}"
            continue
        for name, child in list(module.named_children()):
            child_path = f"{path}.{name}" if path else name
            if kept(child_path, child):
                continue
            replacement, what = _replacement(child)
            if replacement is not None:
                setattr(module, name, replacement)
                result.swapped[child_path] = what
                result.scopes[child_path] = type(child).__name__
            elif what:
                result.kept[child_path] = what
    for config in {id(c): c for c in configs}.values():
        config._attn_implementation = hf.IMPLEMENTATION
    return result
