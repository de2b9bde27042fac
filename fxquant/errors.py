"""Errors fxquant raises. Each says what went wrong, where, and what to do about it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate nearest to ``word`` (for "did you mean" hints), or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def printable(text: str) -> str:
    """``text`` with every control or invisible formatting character escaped (``\\x1b``, ``\\n``, ``\\u202e``), so
    that echoing a key or a name from a hostile file can neither drive the terminal nor break the line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class FxQuantError(Exception):
    """Base class of every error fxquant raises on purpose."""


class RecipeError(FxQuantError, ValueError):
    """A recipe is invalid. Carries the file, the key path and (for misspellings) the closest valid key."""

    def __init__(self, source: str, key_path: str, message: str, suggestion: str | None = None):
        self.source = source
        self.key_path = key_path
        self.suggestion = suggestion
        self.detail = message
        self.key_parts: tuple[str | int, ...] = ()  # the key path as table keys/indices, when a parser knows it
        # one line, whatever the file held: every echoed piece is escaped
        where = source if len(source) <= 200 else f"{source[:120]}... ({len(source)} characters)"
        text = f"{printable(where)}: " + (f"{printable(key_path)}: " if key_path else "") + printable(message)
        if suggestion:
            text += f" (did you mean '{printable(suggestion)}'?)"
        super().__init__(text)


class RecipeErrors(RecipeError):
    """Several problems in one recipe, found in one pass: ``problems`` lists them, and the message has one line
    each (so that a user fixes them all at once, not one run at a time). Its file, key path and suggestion are
    the first problem's."""

    def __init__(self, problems: list[RecipeError]):
        first = problems[0]
        super().__init__(first.source, first.key_path, first.detail, first.suggestion)
        self.key_parts = first.key_parts
        self.problems = problems
        self.args = ("\n".join(str(problem) for problem in problems),)


def recipe_problems(error: RecipeError) -> list[RecipeError]:
    """The single problems an error holds (itself, or a :class:`RecipeErrors`' list).

    Example usage::

        lines = [str(problem) for problem in recipe_problems(err)]
    """
    return list(error.problems) if isinstance(error, RecipeErrors) else [error]


def raise_problems(problems: list[RecipeError]) -> None:
    """Raise nothing for no problem, the problem itself for one, a :class:`RecipeErrors` for several."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise RecipeErrors(problems)


class TraceError(FxQuantError, RuntimeError):
    """The model could not be traced at all. Names the module and the original error."""

    def __init__(self, module_path: str, original: BaseException):
        self.module_path = module_path or "<root>"
        self.original = original
        super().__init__(
            f"could not trace module '{self.module_path}': {type(original).__name__}: {original}. "
            f"List it in leaf_modules (prepare_qat(..., leaf_modules=['{self.module_path}']) or "
            f"quant.leaf_modules in the recipe) to keep it in float, or give concrete_args for the "
            f"arguments that drive its control flow."
        )


class PassError(FxQuantError, RuntimeError):
    """A graph pass failed. Names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, done: list[str], original: BaseException):
        self.pass_name = pass_name
        self.original = original
        before = ", ".join(done) if done else "none"
        super().__init__(
            f"pass '{pass_name}' failed (passes run before it: {before}): {type(original).__name__}: {original}"
        )


class PrepareError(FxQuantError, RuntimeError):
    """prepare_qat could not produce a correct model (bad example inputs, a failed invariant)."""
