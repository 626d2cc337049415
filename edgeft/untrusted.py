"""Text and JSON that another machine wrote (a device over SSH, a stored device run): made safe to print
and to render, and checked for the shape edgeft reads before anything reads it.

A device's strings end up on this terminal (warnings, its CPU name) and in report.md, so every string
it sends goes through :func:`safe_text`: control characters (newlines, escape sequences that recolour
or retitle a terminal, carriage returns that overwrite a line), Unicode bidi overrides (text that
displays in another order than it reads) and lone surrogates (which no file can encode) become
visible ``\\xNN`` / ``\\uNNNN`` escapes. Markdown has its own escaping, in :mod:`edgeft.report`.
"""

from __future__ import annotations

import unicodedata
from typing import Any

# Bidi embedding, override and isolate controls, and the Arabic letter mark: not Cc, but they reorder
# what a terminal or a rendered page shows.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: str) -> str:
    """``text`` on one line, with nothing a terminal or a renderer would act on."""
    if text.isprintable() and not _BIDI.intersection(text):  # the common case: nothing to do
        return text
    return "".join(
        _escape(c) if c in _BIDI or unicodedata.category(c) in ("Cc", "Cs") or c in "\u2028\u2029" else c for c in text
    )


class Oversized(ValueError):
    """A JSON value nested deeper, or made of more values, than a report ever is."""


def cleaned(value: Any, max_depth: int, max_values: int = 1_000_000) -> Any:
    """A copy of decoded JSON with every string, keys included, passed through :func:`safe_text`.

    Walks with its own stack, not recursion, and refuses nesting beyond ``max_depth`` (an edgeft report
    is about eight levels deep) and more than ``max_values`` values in all (each a line of report.md or
    of the terminal at worst); :class:`Oversized` says which.
    """

    def fresh(v: Any) -> Any:
        if isinstance(v, dict):
            return {}
        if isinstance(v, list):
            return []
        return safe_text(v) if isinstance(v, str) else v

    top = fresh(value)
    stack = [(value, top, 1)] if isinstance(value, (dict, list)) else []
    count = 1
    while stack:
        src, dst, depth = stack.pop()
        if depth > max_depth:
            raise Oversized(f"nested more than {max_depth} levels deep")
        count += len(src)
        if count > max_values:
            raise Oversized(f"made of more than {max_values} values")
        for key, v in src.items() if isinstance(src, dict) else enumerate(src):
            new = fresh(v)
            if isinstance(dst, dict):
                dst[safe_text(key)] = new
            else:
                dst.append(new)
            if isinstance(v, (dict, list)):
                stack.append((v, new, depth + 1))
    return top


# ------------------------------------------------------------------------------------------- shapes
#
# A shape is a type marker (NUM, INT, STR, BOOL, ANY), a dict of key -> shape (every key required unless
# its shape is optional()), list_of(shape), map_of(shape) (a JSON object with any keys), optional(shape)
# (absent or null allowed) or a function(value, path) that raises ShapeError itself.


class ShapeError(ValueError):
    """Where a JSON value differs from what edgeft reads (``path: expected ..., got ...``)."""


NUM, INT, STR, BOOL, ANY = "a number", "an integer", "a string", "true or false", "anything"


class optional:  # noqa: N801 - reads as a shape marker
    def __init__(self, shape: Any):
        self.shape = shape


class list_of:  # noqa: N801
    def __init__(self, shape: Any, non_empty: bool = False, max_len: int | None = None):
        self.shape, self.non_empty, self.max_len = shape, non_empty, max_len


class map_of:  # noqa: N801
    def __init__(self, shape: Any):
        self.shape = shape


def show(value: Any, limit: int = 80) -> str:
    """A value from untrusted input, for an error line: a container by its kind, anything else
    escaped by repr (no control character reaches the terminal, no newline splits the line), short."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is(value: Any, marker: str) -> bool:
    if marker == ANY:
        return True
    if marker == BOOL:
        return isinstance(value, bool)
    if isinstance(value, bool):  # True is an int to Python, never a count or a speed here
        return False
    if marker == NUM:
        return isinstance(value, (int, float))
    if marker == INT:
        return isinstance(value, int)
    return isinstance(value, str)


def check_shape(value: Any, shape: Any, path: str = "") -> None:
    """Raise :class:`ShapeError` naming the first place where ``value`` does not have ``shape``."""
    if isinstance(shape, optional):
        if value is not None:
            check_shape(value, shape.shape, path)
    elif isinstance(shape, str):
        if not _is(value, shape):
            raise ShapeError(f"{path or 'the value'}: expected {shape}, got {show(value, 40)}")
    elif isinstance(shape, dict):
        if not isinstance(value, dict):
            raise ShapeError(f"{path or 'the value'}: expected an object, got {show(value, 40)}")
        for key, sub in shape.items():
            where = f"{path}.{key}" if path else key
            if key not in value:
                if not isinstance(sub, optional):
                    raise ShapeError(f"{where}: missing")
                continue
            check_shape(value[key], sub, where)
    elif isinstance(shape, list_of):
        if not isinstance(value, list):
            raise ShapeError(f"{path or 'the value'}: expected a list, got {show(value, 40)}")
        if shape.non_empty and not value:
            raise ShapeError(f"{path or 'the value'}: empty")
        if shape.max_len is not None and len(value) > shape.max_len:
            raise ShapeError(f"{path or 'the value'}: {len(value)} entries, expected at most {shape.max_len}")
        for i, item in enumerate(value):
            check_shape(item, shape.shape, f"{path}[{i}]")
    elif isinstance(shape, map_of):
        if not isinstance(value, dict):
            raise ShapeError(f"{path or 'the value'}: expected an object, got {show(value, 40)}")
        for key, item in value.items():
            check_shape(item, shape.shape, f"{path}[{key!r}]")
    elif callable(shape):
        shape(value, path)
    else:  # pragma: no cover - a mistake in a shape written here
        raise TypeError(f"not a shape: {shape!r}")
