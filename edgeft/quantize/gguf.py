"""Stage `quantize` for GGUF: llama.cpp's own quantizer through its C API.

llama-cpp-python ships no ``llama-quantize`` binary, so we call ``llama_model_quantize`` directly.
The requested type is a *mix*: llama.cpp chooses per-tensor types (and falls back when a row width is
not a multiple of a K-quant's 256-value block), so the stage records the tensor types actually
written, read back from the file.
"""

from __future__ import annotations

import ctypes
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError
from ..stage import StageOutput, content_hash, run_stage
from .gguf_types import GGUF_QUANT_TYPES

OUTPUT_NAME = "model.gguf"


def tensor_type_counts(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds, e.g. ``{"Q5_0": 166, "F32": 61}``."""
    reader = read_gguf(path)
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def read_gguf(path: Path):
    """gguf-py's reader over ``path``; a file it cannot parse is a ModelError naming it."""
    from gguf import GGUFReader

    from ..loading import loading

    check_gguf_header(path)
    with loading(path, "GGUF"):
        return GGUFReader(path)


# GGUF files start with the magic "GGUF" and a little-endian uint32 version (llama.cpp reads 2 and 3).
_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)


def check_gguf_header(path: Path) -> None:
    """Refuse, in microseconds, a path that is not a GGUF file (folder, empty, other format, old version)."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path}: expected a .gguf file, found a folder")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such GGUF file") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    if head[:4] != _GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected {_GGUF_MAGIC!r})")
    version = int.from_bytes(head[4:8], "little")
    if version not in _GGUF_VERSIONS:
        raise ModelError(
            f"{path}: GGUF version {version} is not supported (expected {' or '.join(map(str, _GGUF_VERSIONS))})"
        )


def quantize_file(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """Quantize GGUF ``src`` (F32/F16) to ``dst`` with llama.cpp type mix ``quant``."""
    if quant not in GGUF_QUANT_TYPES:
        raise ConfigError(f"unknown GGUF quant type {quant!r}; expected one of {', '.join(GGUF_QUANT_TYPES)}")
    import logging

    import llama_cpp

    # llama.cpp logs every tensor it converts and each K-quant fallback; llama-cpp-python routes
    # that through this logger, mapping ggml's WARN to logging.ERROR (its table predates ggml's
    # current enum), so only CRITICAL silences the fallback lines. The report lists the types
    # actually written instead, and a failure still raises below.
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_QUANT_TYPES[quant]
    params.nthread = threads if threads > 0 else (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise ModelError(f"{src}: llama.cpp could not quantize to {quant} (llama_model_quantize returned {rc})")


def quantize(gguf_dir: Path, out_dir: Path, quant: str, threads: int = 0) -> StageOutput:
    """Cached stage: ``gguf_dir/model.gguf`` → ``out_dir/model.gguf`` in type ``quant``."""
    src = Path(gguf_dir) / OUTPUT_NAME
    if not src.is_file():
        raise ModelError(f"{gguf_dir}: expected an exported {OUTPUT_NAME} there")
    check_gguf_header(src)
    inputs = {"gguf": content_hash(gguf_dir)}
    params = {"quant": quant}

    def work(tmp: Path) -> dict[str, Any]:
        quantize_file(src, tmp / OUTPUT_NAME, quant, threads)
        return {"tensor_types": tensor_type_counts(tmp / OUTPUT_NAME), "size_bytes": (tmp / OUTPUT_NAME).stat().st_size}

    return run_stage(out_dir, "quantize", inputs, params, work)


def describe(path: Path, reader=None) -> dict[str, Any]:
    """Size, tensor-type mix and the file type llama.cpp recorded (``general.file_type``)."""
    from gguf import Keys

    reader = reader or read_gguf(path)
    field = reader.get_field(Keys.General.FILE_TYPE)
    ftype = int(field.contents()) if field is not None else None
    names = {v: k for k, v in GGUF_QUANT_TYPES.items()}
    return {
        "size_bytes": Path(path).stat().st_size,
        "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items())),
        "file_type": names.get(ftype, f"ftype {ftype}"),
    }
