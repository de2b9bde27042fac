"""fxquant.search: per-layer bit widths from sensitivity under a BOPs or size budget, and SAQ's generator.

Example usage::

    plan, layers = fxquant.search.search(qmodel, batches, {"budget": "avg3", "method": "hessian"})
    fxquant.search.apply(qmodel, plan)
"""

from .allocation import Option, allocate
from .budget import (
    Budget,
    LayerInfo,
    layer_table,
    parse_budget,
    shared_input_groups,
    tie_groups,
    total_cost,
)
from .cost import LayerCost, layer_macs, measure
from .from_recipe import search_for_recipe
from .plan import apply, load_plan, save_plan
from .report import report, save_bar_plot
from .run import search, search_config
from .saq_generator import Controller, GeneratorResult, generate
from .sensitivity import hutchinson_traces, quantization_error, sam_increases

__all__ = [
    "Budget",
    "Controller",
    "GeneratorResult",
    "LayerCost",
    "LayerInfo",
    "Option",
    "allocate",
    "apply",
    "generate",
    "hutchinson_traces",
    "layer_macs",
    "layer_table",
    "load_plan",
    "measure",
    "parse_budget",
    "quantization_error",
    "report",
    "sam_increases",
    "save_bar_plot",
    "save_plan",
    "search",
    "search_config",
    "search_for_recipe",
    "shared_input_groups",
    "tie_groups",
    "total_cost",
]
