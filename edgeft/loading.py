"""The boundary where edgeft hands a user's file to a third-party loader.

transformers, peft, safetensors, llama.cpp and numpy report a broken input as whatever exception
their code happened to hit (``ValueError``, ``RuntimeError`` with a 40-line size-mismatch table,
safetensors' ``SafetensorError``, protobuf's ``DecodeError``, ...). Wrapped in :func:`loading`, such a failure becomes one
:class:`ModelError` line that names the file. The block should hold the third-party call only:
exceptions that mean *we* called it wrongly (``TypeError``, ``AttributeError``, ``NameError``,
``ImportError``) are not translated, so our bugs keep their traceback.
"""

from __future__ import annotations

import contextlib
import json
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

from .errors import EdgeftError, ModelError, first_line

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


def read_json_object(path: Path, missing: str) -> dict:
    """A JSON object from a user's file; ``missing`` is the message when the file is absent."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(missing) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return obj
