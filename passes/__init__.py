"""fxquant.passes: graph passes, each ``fn(gm: GraphModule, ctx: PassContext) -> PassResult`` (torch.fx's: the
graph module and whether the pass modified it), run in the order of :data:`PREPARE_PASSES` under :data:`ORDER_RULES`.

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
from .manager import OrderRule, check_order, run_passes
from .swap_modules import SwapResult, swap_modules
from .trace import TraceResult, trace_model
from .verify import check_invariants, verify

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

# What must run before what, checked by run_passes before a pass runs.
ORDER_RULES = (
    OrderRule(decompose_attention, annotate, "the matmuls it writes are annotated like any other"),
    OrderRule(annotate, insert_quantizers, "quantizers are inserted where annotate put specs"),
    OrderRule(annotate, fold_bn, "fold_bn keeps the annotated conv node (and its spec) in place"),
    OrderRule(fold_bn, insert_quantizers, "a folded conv gets its weight quantizer on the folded weight"),
    OrderRule(insert_quantizers, insert_perturbations, "perturbations go between a quantizer and its op"),
    OrderRule(insert_perturbations, insert_taps, "taps look for the float input behind a perturbation"),
    OrderRule(insert_taps, fuse_activations, "an activation function a tap reads has another user and stays"),
    OrderRule(insert_perturbations, fuse_activations, "likewise one that a perturbation reads"),
    OrderRule(insert_quantizers, assign_bits, "bits are assigned to the inserted quantizers"),
    OrderRule(assign_bits, verify, "verify checks the finished graph"),
    OrderRule(fuse_activations, verify, "verify checks the finished graph"),
)

__all__ = [
    "ORDER_RULES",
    "PREPARE_PASSES",
    "LayerRecord",
    "OrderRule",
    "PassContext",
    "PassRecord",
    "SwapResult",
    "TraceResult",
    "annotate",
    "assign_bits",
    "check_invariants",
    "check_order",
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
