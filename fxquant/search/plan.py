"""Bit plans: per-layer widths as files (:mod:`fxquant.config.bit_plan`), applied to a prepared model.

Example usage::

    plan = fxquant.search.load_plan("plan.toml")
    fxquant.search.apply(qmodel, plan)
"""

from __future__ import annotations

from fxquant.config.bit_plan import BitPlan, load_plan, save_plan
from fxquant.qat_model import QATModel
from fxquant.quant.controls import apply_bit_plan, check_plan_layers

__all__ = ["apply", "load_plan", "save_plan"]


def apply(qmodel: QATModel, plan: BitPlan) -> list[str]:
    """Set the widths ``plan`` gives (layers it does not name keep theirs), without re-tracing, and record it
    as ``qmodel.bit_plan``. A shared activation quantizer takes the widest width its layers ask for. Returns
    notes on such conflicts.

    Example usage::

        fxquant.search.apply(qmodel, {"layer1.0.conv1": (3, 3)})
    """
    targets = qmodel.plan_targets()
    check_plan_layers(plan, [t.name for t in targets])
    notes = apply_bit_plan([t for t in targets if t.name in plan], plan)
    merged = dict(qmodel.bit_plan or {})
    merged.update(plan)
    qmodel.bit_plan = merged
    return notes
