"""The ``fxquant`` command (also ``python -m fxquant``): one small module per command.

Errors are one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from fxquant.errors import FxQuantError, RecipeError, printable, recipe_problems

from . import demo, export, recipes, search, summary, train, zeroshot

EXIT_USAGE = 2
# Each module adds its own sub-command(s); the order is the order of `fxquant --help`.
COMMANDS = (demo, summary, train, search, zeroshot, export, recipes)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (``fxquant train: error: argument --epochs: ...``), escaped."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = OneLineParser(prog="fxquant", description="Quantization-aware training by graph rewriting.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fxquant`` command.

    Example usage::

        main(["validate", "my_recipe.toml"])      # 0, or 2 with one line on stderr
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FxQuantError, ValueError, OSError) as err:
        # bad input (a recipe, a checkpoint, a file, a shape that does not fit the model): one escaped line per
        # problem (a recipe may have several, all reported at once)
        text = str(err) if not isinstance(err, OSError) or not err.filename else f"{err.filename}: {err.strerror}"
        lines = [str(problem) for problem in recipe_problems(err)] if isinstance(err, RecipeError) else [text]
        for line in lines:
            print(f"fxquant {args.command}: error: {printable(line)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fxquant {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["EXIT_USAGE", "build_parser", "main"]
