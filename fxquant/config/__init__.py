"""fxquant.config: recipes and their typed sections, bit-plan files, and the parser that validates them.

Example usage::

    recipe = fxquant.config.load_recipe("fpq_w4a4")
    recipe.losses[0].p            # 0.1
"""

from .bit_plan import BitPlan, load_plan, save_plan
from .fields import Section, Where, describe, parse
from .recipe import FeaturePlan, Recipe, builtin_names, feature_plan, load_recipe, merge, recipe_from_text
from .sections import (
    LOSS_KINDS,
    BitsConfig,
    ConsistencyConfig,
    CoresetConfig,
    DKDConfig,
    FPQConfig,
    KDConfig,
    LayerBits,
    LossConfig,
    MECConfig,
    QuantSection,
    Rule,
    SAMConfig,
    SearchConfig,
    TrainConfig,
    ZeroShotConfig,
)
from .toml_text import dumps_toml

__all__ = [
    "LOSS_KINDS",
    "BitPlan",
    "BitsConfig",
    "ConsistencyConfig",
    "CoresetConfig",
    "DKDConfig",
    "FPQConfig",
    "FeaturePlan",
    "KDConfig",
    "LayerBits",
    "LossConfig",
    "MECConfig",
    "QuantSection",
    "Recipe",
    "Rule",
    "SAMConfig",
    "SearchConfig",
    "Section",
    "TrainConfig",
    "Where",
    "ZeroShotConfig",
    "builtin_names",
    "describe",
    "dumps_toml",
    "feature_plan",
    "load_plan",
    "load_recipe",
    "merge",
    "parse",
    "recipe_from_text",
    "save_plan",
]
