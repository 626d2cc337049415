"""The boundary where edgeft hands a user's file to a third-party loader.

transformers, peft, safetensors, llama.cpp and numpy report a broken input as whatever exception
their code happened to hit (``ValueError``, ``RuntimeError`` with a 40-line size-mismatch table,
safetensors' own ``SafetensorError``, ...). Wrapped in :func:`loading`, such a failure becomes one
:class:`ModelError` line that names the file. The block should hold the third-party call only:
exceptions that mean *we* called it wrongly (``TypeError``, ``AttributeError``, ``NameError``,
``ImportError``) are not translated, so our bugs keep their traceback.
"""

from __future__ import annotations

import contextlib
import struct
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


def _safetensors_error() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # the torch-free device install has no safetensors
        return ()
    return (SafetensorError,)


@contextlib.contextmanager
def loading(path: Path | str, what: str) -> Iterator[None]:
    """Turn a third-party loader's failure on ``path`` into ``ModelError("PATH: cannot load WHAT: ...")``."""
    try:
        yield
    except EdgeftError:
        raise
    except _INPUT_ERRORS + _safetensors_error() as e:
        raise ModelError(f"{path}: cannot load {what}: {first_line(e)}") from e
