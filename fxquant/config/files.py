"""Reading the TOML files a recipe names, as untrusted data: size and nesting limits, UTF-8 only, and references
(``extends``, ``[bits] plan``) that stay inside the declaring file's folder.

Every problem is a :class:`~fxquant.errors.RecipeError` located at the file (and key) that holds it.

Example usage::

    data = read_toml(Path("recipes/mine.toml"), Where("recipes/mine.toml"))
    plan = contained("plans/w3.toml", Path("recipes/mine.toml"), Where("recipes/mine.toml").key("bits").key("plan"))
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .fields import Where, shown

MAX_BYTES = 1 << 20  # a recipe or plan is a few kB; a plan of every layer of a large model stays far below 1 MiB
MAX_DEPTH = 16  # recipe tables nest at most 4 deep; deeper data can only be an attack on the parser's recursion


def read_toml(path: Path, where: Where) -> dict[str, Any]:
    """The TOML table in ``path``, or a RecipeError at ``where`` (the file itself, or the key that named it)."""
    try:
        if not path.exists():
            raise where.error(f"file not found: {path}")
        if not path.is_file():
            raise where.error(f"not a regular file: {path}")
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise where.error(f"{path} is {size} bytes; recipe and plan files are limited to {MAX_BYTES}")
        raw = path.read_bytes()
    except OSError as err:  # a name too long for the file system, a folder without permission...
        raise where.error(f"cannot read {shown(str(path))}: {err.strerror or err}") from None
    return parse_toml_bytes(raw, Where(str(path)))


def parse_toml_bytes(raw: bytes, where: Where) -> dict[str, Any]:
    """Parse UTF-8 TOML bytes (a leading byte-order mark is allowed) with the nesting limit."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise where.error(
            f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); recipes and plans are UTF-8 TOML"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise where.error(f"not valid TOML: {err}") from None
    except RecursionError:
        raise where.error(f"not a recipe: arrays or tables nested deeper than {MAX_DEPTH} levels") from None
    check_depth(data, where)
    return data


def check_depth(data: Any, where: Where) -> None:
    """A RecipeError at the first value nested deeper than MAX_DEPTH (checked without recursion)."""
    stack: list[tuple[Any, Where, int]] = [(data, where, 0)]
    while stack:
        value, at, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise at.error(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, at.key(k), depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, at.index(i), depth + 1) for i, v in enumerate(value))


def contained(reference: Any, declaring_file: Path, where: Where, builtin_ok: bool = False) -> Path:
    """The file a recipe names by ``reference``: a relative path to a ``.toml`` file that stays inside the
    declaring file's folder once symbolic links and ``..`` are resolved. Anything else is a RecipeError at
    ``where`` (the declaring file and its key): a recipe is data and must not make fxquant open other files."""
    if not isinstance(reference, str):
        raise where.error(f"must be a string, got {shown(reference)}")
    folder = declaring_file.resolve().parent
    rule = (
        f"must be {'a built-in recipe name or ' if builtin_ok else ''}a relative path to a .toml file inside "
        f"{folder} (to use another file, load it yourself and pass the Recipe)"
    )
    if not reference or "\0" in reference or not reference.endswith(".toml"):
        raise where.error(rule)
    candidate = Path(reference)
    if candidate.is_absolute() or candidate.drive:
        raise where.error(f"{rule}; got an absolute path")
    try:
        target = (folder / candidate).resolve()
        outside, is_file, exists = not target.is_relative_to(folder), target.is_file(), target.exists()
    except OSError as err:  # a name too long for the file system, and the like
        raise where.error(f"{rule}; {shown(reference)} cannot be looked up: {err.strerror or err}") from None
    if outside:
        raise where.error(f"{rule}; {reference!r} leads outside it")
    if not is_file:
        raise where.error(f"file not found: {target}" if not exists else f"not a regular file: {target}")
    return target
