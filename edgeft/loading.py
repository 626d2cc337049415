"""The boundary where edgeft hands a user's file to a third-party loader.

transformers, peft, safetensors, llama.cpp and numpy report a broken input as whatever exception
their code happened to hit (``ValueError``, ``RuntimeError`` with a 40-line size-mismatch table,
safetensors' ``SafetensorError``, protobuf's ``DecodeError``, ...). Wrapped in :func:`loading`, such a failure becomes one
:class:`ModelError` line that names the file. The block should hold the third-party call only:
exceptions that mean *we* called it wrongly (``TypeError``, ``AttributeError``, ``NameError``,
``ImportError``) are not translated, so our bugs stay internal errors (exit 3, traceback with
``EDGEFT_RAISE_ERRORS=1``) rather than blaming the user's file.
"""

from __future__ import annotations

import contextlib
import json
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import tomllib

from .errors import ConfigError, EdgeftError, ModelError, first_line

# What loaders raise on bad *input*. Deliberately excludes TypeError/AttributeError/NameError.
_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,  # includes json.JSONDecodeError and UnicodeDecodeError
    RuntimeError,
    KeyError,
    IndexError,
    EOFError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
)


def _library_errors() -> tuple[type[BaseException], ...]:
    """Loaders' own exception types, from the libraries already imported (none is imported here)."""
    found: list[type[BaseException]] = []
    if "safetensors" in sys.modules:
        found.append(sys.modules["safetensors"].SafetensorError)  # truncated or garbage weight files
    if "google.protobuf.message" in sys.modules:
        found.append(sys.modules["google.protobuf.message"].Error)  # an ONNX graph that does not parse
    return tuple(found)


@contextlib.contextmanager
def loading(path: Path | str, what: str) -> Iterator[None]:
    """Turn a third-party loader's failure on ``path`` into ``ModelError("PATH: cannot load WHAT: ...")``."""
    try:
        yield
    except EdgeftError:
        raise
    except _INPUT_ERRORS + _library_errors() as e:
        raise ModelError(f"{path}: cannot load {what}: {first_line(e)}") from e


# The largest JSON file edgeft reads from a user (a Llama-3 or Gemma tokenizer.json is 9-33 MB); a
# file of gigabytes is not a config, and parsing it would take the memory of several copies of it.
MAX_JSON_BYTES = 64 << 20


class FileTooLarge(OSError):
    """A user's file larger than edgeft reads for its kind; callers report it like any unreadable file."""


class JSONTooDeep(json.JSONDecodeError):
    """JSON that Python's parser cannot read for reasons other than syntax: arrays or objects nested
    past the recursion limit, an integer of thousands of digits. A :class:`json.JSONDecodeError`, so
    every caller's "not valid JSON" message covers it; the position is unknown (line 1, column 1)."""

    def __init__(self, msg: str):
        super().__init__(msg, "", 0)

    def __str__(self) -> str:
        return self.msg

    def __reduce__(self):
        return type(self), (self.msg,)


def parse_json(text: str) -> Any:
    """``json.loads`` whose only failure on any input is :class:`json.JSONDecodeError`.

    The standard parser raises ``RecursionError`` for ``[[[[...`` 1,000 levels deep and a bare
    ``ValueError`` for an integer longer than 4,300 digits; neither is a syntax error its callers
    catch, so a 200 KB file of brackets would end in a traceback.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise JSONTooDeep("arrays or objects nested too deeply for edgeft to read") from None
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # int_max_str_digits; json.loads of a str raises no UnicodeDecodeError
        raise JSONTooDeep(first_line(e, 120)) from None


def read_text(path: Path | str, max_bytes: int = MAX_JSON_BYTES) -> str:
    """A user's UTF-8 text file, at most ``max_bytes`` of it read: a larger file (or an endless one such
    as a device node) raises :class:`FileTooLarge` instead of filling memory. Other failures are the
    usual ``OSError`` (FileNotFoundError, IsADirectoryError, ...) and ``UnicodeDecodeError``."""
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise FileTooLarge(f"larger than the {_size(max_bytes)} edgeft reads from such a file")
    return raw.decode("utf-8")


def read_json(path: Path | str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """:func:`read_text` + :func:`parse_json`: raises OSError, UnicodeDecodeError or JSONDecodeError only."""
    return parse_json(read_text(path, max_bytes))


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def read_json_object(path: Path, missing: str, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from a user's file; ``missing`` is the message when the file is absent."""
    path = Path(path)
    try:
        obj = read_json(path, max_bytes)
    except FileNotFoundError:
        raise ModelError(missing) from None
    except FileTooLarge as e:
        raise ModelError(f"{path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return obj


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A registry entry a user may write (a target, a device profile) as a dict; an unreadable or
    invalid file is one ConfigError naming it and ``what`` it was meant to be."""
    try:
        return tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read {what} ({e})") from None
