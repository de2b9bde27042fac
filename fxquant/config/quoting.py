"""TOML quoting of keys and strings, shared by the writers and by error messages that show key paths."""

from __future__ import annotations


def quote_key(key: str) -> str:
    """A TOML key: bare when it can be, else a quoted string (so ``""`` and keys with dots or escapes stay
    readable in a key path)."""
    if key and key.isascii() and all(c.isalnum() or c in "_-" for c in key):
        return key
    return quote_string(key)


def quote_string(text: str) -> str:
    """A TOML basic string, with quotes, backslashes and control characters escaped."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped) + '"'
