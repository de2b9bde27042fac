"""``fxquant recipes`` (the built-in recipes) and ``fxquant validate FILE`` (check a recipe file)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from fxquant.config import Recipe, builtin_names, describe, load_recipe


def add_parser(sub: argparse._SubParsersAction) -> None:
    recipes = sub.add_parser("recipes", help="list the built-in recipes (--keys: every recipe key)")
    recipes.add_argument("--keys", action="store_true", help="list every key a recipe may set, with its type")
    recipes.set_defaults(func=run_recipes)
    validate = sub.add_parser("validate", help="check a recipe file")
    validate.add_argument("file")
    validate.set_defaults(func=run_validate)


def run_recipes(args: argparse.Namespace) -> int:
    if args.keys:
        table = Table(title="recipe keys")
        table.add_column("key")
        table.add_column("accepts")
        for key, text in describe(Recipe):
            table.add_row(key, text)
        Console().print(table)
        return 0
    table = Table(title="built-in recipes")
    for column in ("name", "W bits", "A bits", "description"):
        table.add_column(column)
    for name in builtin_names():
        recipe = load_recipe(name)
        table.add_row(name, str(recipe.quant.weight.bits), str(recipe.quant.activation.bits), recipe.description)
    Console().print(table)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.file)
    print(f"{args.file}: valid recipe '{recipe.name}' (W{recipe.quant.weight.bits}A{recipe.quant.activation.bits})")
    return 0
