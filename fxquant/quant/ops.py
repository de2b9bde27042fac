"""fxquant's fake-quant operators, one kernel per device behind torch's dispatcher.

Three ops (row semantics and numerics in :mod:`fxquant.quant.reference`):

* ``fxquant::fake_quantize(x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high) -> y``
* ``fxquant::fake_quantize_backward(grad, x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high,
  output_mask) -> (grad_x, grad_scale, grad_offset)``
* ``fxquant::fake_quantize_dynamic(x, qmin, qmax, symmetric) -> y`` (per-token steps from each token's range;
  its gradient passes straight through)

Kernels, chosen by torch's dispatch on the tensors' device:

======================  ==============================  =========================================
device                  forward / backward              registered by
======================  ==============================  =========================================
CPU                     the C passes (``fake_quant.c``)  ``native/fake_quant_op.cpp``
CUDA                    Triton (``triton_kernels.py``)   here, when Triton imports
any other (and the      the torch-ops reference          here (``CompositeExplicitAutograd``)
fallbacks)
meta / fake tensors     shapes only                      here (``register_fake``)
======================  ==============================  =========================================

Autograd is registered once, for every device: by the C++ library (a C++ node, the cheapest per call) or, where
that library cannot be built (no C++ compiler, ``FXQUANT_NATIVE_KERNEL=0``), by
``torch.library.register_autograd`` here. Either saves x (in its own dtype), the step and the offset, and calls
``fxquant::fake_quantize_backward`` through the dispatcher, so each device's backward kernel is reached.

:func:`kernels` registers everything on its first call and says what backs the ops in this process; nothing is
registered at import time.

Example usage::

    print(kernels())   # Kernels(cpu='C', cuda='Triton', autograd='C++', note=None)
    y = torch.ops.fxquant.fake_quantize(x, scale, None, -8, 7, 0.01, -math.inf, math.inf)
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from fxquant.quant import reference
from fxquant.quant.grid import in_layout_of
from fxquant.quant.native_build import NativeKernelUnavailable, built_op_library, native_kernel_requested

SCHEMAS = {
    "fake_quantize": "fake_quantize(Tensor x, Tensor scale, Tensor? zero_point, int qmin, int qmax, float grad_factor, "
    "float input_low, float input_high) -> Tensor",
    "fake_quantize_backward": "fake_quantize_backward(Tensor grad, Tensor x, Tensor scale, Tensor? zero_point, "
    "int qmin, int qmax, float grad_factor, float input_low, float input_high, bool[3] output_mask) "
    "-> (Tensor, Tensor, Tensor)",
    "fake_quantize_dynamic": "fake_quantize_dynamic(Tensor x, int qmin, int qmax, bool symmetric) -> Tensor",
}
# flexible_layout: under torch.compile, inductor hands the backward its tensors in the layout it chose (a compiled
# CNN's channels-last activations) instead of copying them to the traced strides; every kernel takes any layout.
_TAGS = {"fake_quantize_backward": (torch.Tag.flexible_layout,)}


@dataclass(frozen=True)
class Kernels:
    """What backs the ops in this process: ``cpu`` is ``"C"`` or ``"reference"``, ``cuda`` ``"Triton"`` or
    ``"reference"``, ``autograd`` ``"C++"`` or ``"Python"``; ``note`` says why a fallback is in use."""

    cpu: str
    cuda: str
    autograd: str
    note: str | None = None


@functools.cache  # once per process: the Library object must stay alive, or its registrations go with it
def _library() -> tuple[torch.library.Library, Kernels]:
    lib = torch.library.Library("fxquant", "FRAGMENT")
    for name, schema in SCHEMAS.items():
        lib.define(schema, tags=_TAGS.get(name, ()))
    torch.library.register_fake("fxquant::fake_quantize", _fake_forward, lib=lib)
    torch.library.register_fake("fxquant::fake_quantize_backward", _fake_backward, lib=lib)
    torch.library.register_fake("fxquant::fake_quantize_dynamic", _fake_dynamic, lib=lib)
    lib.impl("fake_quantize", _reference_forward, "CompositeExplicitAutograd")
    lib.impl("fake_quantize_backward", _reference_backward, "CompositeExplicitAutograd")
    lib.impl("fake_quantize_dynamic", _reference_dynamic, "CompositeExplicitAutograd")
    triton = _triton_kernels()
    if triton is not None:
        lib.impl("fake_quantize", _or_reference(triton.fake_quantize_forward, _reference_forward), "CUDA")
        lib.impl("fake_quantize_backward", _or_reference(triton.fake_quantize_backward, _reference_backward), "CUDA")
        lib.impl("fake_quantize_dynamic", _or_reference(_triton_dynamic, _reference_dynamic), "CUDA")
    cuda = "Triton" if triton is not None else "reference"
    try:
        if not native_kernel_requested():
            raise NativeKernelUnavailable("FXQUANT_NATIVE_KERNEL=0")
        torch.ops.load_library(str(built_op_library()))  # CPU kernels and the autograd node
        return lib, Kernels("C", cuda, "C++")
    except (NativeKernelUnavailable, OSError, RuntimeError) as reason:
        note = str(reason)
    if native_kernel_requested():
        warnings.warn(
            f"fxquant: the native CPU kernels are unavailable ({note}); using the torch-ops reference on CPU and "
            "an autograd node in Python (same numerics, slower). Install a C and a C++ compiler (gcc, g++) for the "
            "fast ones, or set FXQUANT_NATIVE_KERNEL=0 to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )
    torch.library.register_autograd(
        "fxquant::fake_quantize", _python_backward, setup_context=_python_setup_context, lib=lib
    )
    torch.library.register_autograd(
        "fxquant::fake_quantize_dynamic", _straight_through, setup_context=_nothing_saved, lib=lib
    )
    return lib, Kernels("reference", cuda, "Python", note)


def kernels() -> Kernels:
    """Register fxquant's ops on the first call (building the native library if needed) and say what backs them.

    Example usage::

        kernels().cpu   # "C" where a C and a C++ compiler were found
    """
    return _library()[1]


@torch.compiler.assume_constant_result  # under torch.compile: run once while tracing, never traced into
def ops_ready() -> bool:
    """True once the ops are registered (registering them first): what a caller of ``torch.ops.fxquant`` calls.

    Example usage::

        ops_ready() and torch.ops.fxquant.fake_quantize(x, s, None, -8, 7, 1.0, -inf, inf)
    """
    return _library() is not None


def _triton_kernels() -> ModuleType | None:
    """fxquant's Triton kernels, or None where Triton is not installed (CPU-only torch builds ship without it).
    Imported by name: Triton is optional, and only this function may need it."""
    try:
        return importlib.import_module("fxquant.quant.triton_kernels")
    except ImportError:
        return None


_UNBUILDABLE: set[str] = set()  # kernels that failed to build on this machine: the reference runs instead


def _or_reference(kernel: Callable[..., Any], reference_kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel``, falling back to ``reference_kernel`` (the same numbers, slower) for the rest of the process, with
    one warning, when Triton cannot build it for this GPU (an older Triton, an unsupported GPU)."""

    name = kernel.__name__

    @functools.wraps(kernel)
    def run(*args: Any) -> Any:
        if name not in _UNBUILDABLE:
            try:
                return kernel(*args)
            except _triton_kernels().KERNEL_ERRORS as error:
                _UNBUILDABLE.add(name)
                first = (str(error).strip().splitlines() or [""])[0][:200]
                warnings.warn(
                    f"fxquant: Triton could not build the GPU kernel {name} here ({type(error).__name__}: {first}); "
                    "using the torch-ops reference for it from now on (same numbers, slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return reference_kernel(*args)

    return run


def _triton_dynamic(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool) -> torch.Tensor:
    y = _triton_kernels().fake_quantize_dynamic(x, qmin, qmax, symmetric)
    return _reference_dynamic(x, qmin, qmax, symmetric) if y is None else y


def _reference_dynamic(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool) -> torch.Tensor:
    return in_layout_of(reference.dynamic_forward(x, qmin, qmax, symmetric), x)


def _reference_forward(x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high):
    return in_layout_of(reference.forward(x, scale, zero_point, qmin, qmax, input_low, input_high), x)


def _reference_backward(grad, x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high, output_mask):
    grad_x, grad_scale, grad_offset = reference.backward(
        grad, x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high, output_mask
    )
    return in_layout_of(grad_x, x) if output_mask[0] else grad_x, grad_scale, grad_offset


def _fake_forward(x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high):
    return torch.empty_like(x)


def _fake_backward(grad, x, scale, zero_point, qmin, qmax, grad_factor, input_low, input_high, output_mask):
    return (
        torch.empty_like(x) if output_mask[0] else x.new_empty(0),
        torch.empty_like(scale) if output_mask[1] else scale.new_empty(0),
        torch.empty_like(zero_point) if output_mask[2] and zero_point is not None else scale.new_empty(0),
    )


def _fake_dynamic(x, qmin, qmax, symmetric):
    return torch.empty_like(x)


def _python_setup_context(ctx, inputs, output) -> None:
    x, scale, zero_point, *numbers = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.numbers = numbers


def gradients_wanted(ctx: Any, zero_point: torch.Tensor | None) -> list[bool]:
    """The backward op's ``output_mask`` for an autograd context whose first inputs are (x, scale, zero_point).

    Example usage::

        mask = gradients_wanted(ctx, zero_point)   # [True, True, False] for a symmetric quantizer
    """
    return [ctx.needs_input_grad[0], ctx.needs_input_grad[1], zero_point is not None and ctx.needs_input_grad[2]]


def _python_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    mask = gradients_wanted(ctx, zero_point)
    grads = torch.ops.fxquant.fake_quantize_backward(grad, x, scale, zero_point, *ctx.numbers, mask)
    return (*(g if wanted else None for g, wanted in zip(grads, mask)), None, None, None, None, None)


def _nothing_saved(ctx, inputs, output) -> None:
    pass


def _straight_through(ctx, grad):
    return grad, None, None, None
