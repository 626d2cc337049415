"""Stage `quantize` for GGUF: llama.cpp's own quantizer through its C API.

llama-cpp-python ships no ``llama-quantize`` binary, so we call ``llama_model_quantize`` directly.
The requested type is a *mix*: llama.cpp chooses per-tensor types (and falls back when a row width is
not a multiple of a K-quant's 256-value block), so the stage records the tensor types actually
written, read back from the file.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from ...errors import ConfigError, ModelError
from ...stage import StageOutput, content_hash, run_stage
from .inspect import GGUF_FILE, check_gguf_header, tensor_type_counts
from .types import GGUF_QUANT_TYPES


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
    src = Path(gguf_dir) / GGUF_FILE
    if not src.is_file():
        raise ModelError(f"{gguf_dir}: expected an exported {GGUF_FILE} there")
    check_gguf_header(src)
    inputs = {"gguf": content_hash(gguf_dir)}
    params = {"quant": quant}

    def work(tmp: Path) -> dict[str, Any]:
        quantize_file(src, tmp / GGUF_FILE, quant, threads)
        return {"tensor_types": tensor_type_counts(tmp / GGUF_FILE), "size_bytes": (tmp / GGUF_FILE).stat().st_size}

    return run_stage(out_dir, "quantize", inputs, params, work)
