"""fxquant.passes: graph passes, each ``fn(gm: GraphModule, ctx: PassContext) -> GraphModule``.

They import fxquant's runtime (:mod:`fxquant.quant`) and recipes (:mod:`fxquant.config`), never the API, the CLI,
training, search or deployment code.
"""

from .annotate import annotate, graph_roles
from .assign_bits import assign_bits
from .context import LayerRecord, PassContext, PassRecord
from .decompose_attention import decompose_attention
from .fold_bn import fold_bn
from .fuse_activations import fuse_activations
from .insert_quantizers import insert_quantizers
from .insert_taps import insert_perturbations, insert_taps
from .manager import run_passes
from .swap_modules import SwapResult, swap_modules
from .trace import TraceResult, trace_model
from .verify import check_invariants, verify

# fold_bn keeps the conv node (and its spec) in place, so one annotate before it is enough.
# Perturbations go between a quantizer and its op before taps look for the float input behind both.
# decompose_attention goes first: the matmuls it writes are annotated like any other.
# fuse_activations goes after the taps and perturbations: an activation function they read has another user and
# stays.
PREPARE_PASSES = (
    decompose_attention,
    annotate,
    fold_bn,
    insert_quantizers,
    insert_perturbations,
    insert_taps,
    fuse_activations,
    assign_bits,
    verify,
)

__all__ = [
    "PREPARE_PASSES",
    "LayerRecord",
    "PassContext",
    "PassRecord",
    "SwapResult",
    "TraceResult",
    "annotate",
    "assign_bits",
    "check_invariants",
    "decompose_attention",
    "fold_bn",
    "fuse_activations",
    "graph_roles",
    "insert_perturbations",
    "insert_quantizers",
    "insert_taps",
    "run_passes",
    "swap_modules",
    "trace_model",
    "verify",
]
