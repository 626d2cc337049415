"""llama.cpp's quantizer on one file: ``llama_model_quantize`` through llama-cpp-python's C API.

llama-cpp-python ships no ``llama-quantize`` binary, so the function is called directly, with the
importance matrix, header keys and per-tensor type overrides passed as the C structs it takes. Both
the ``quantize`` stage and the sensitivity sweep's level files are written by it.
"""

from __future__ import annotations

import ctypes
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError, ModelError
from ...machine import usable_cores
from .types import GGUF_QUANT_TYPES, TENSOR_TYPES


def quantize_file(
    src: Path,
    dst: Path,
    quant: str,
    threads: int = 0,
    imatrix: dict[str, Any] | None = None,
    metadata: dict[str, str | int] | None = None,
    tensor_types: dict[str, str] | None = None,
) -> None:
    """Quantize GGUF ``src`` (F32/F16) to ``dst`` with llama.cpp type mix ``quant``.

    ``imatrix`` (tensor name → per-column importance, see :mod:`.imatrix`) weighs each column's
    rounding error; ``metadata`` adds string/integer keys to the output's header (how it was made);
    ``tensor_types`` (tensor name → ggml type name, see :mod:`.mixed`) overrides the mix's choice for
    those tensors, ``quant`` then only names the file type in the header and covers the rest."""
    if quant not in GGUF_QUANT_TYPES:
        raise ConfigError(f"unknown GGUF quant type {quant!r}; expected one of {', '.join(GGUF_QUANT_TYPES)}")
    import llama_cpp  # optional (the llamacpp extra)

    # llama.cpp logs every tensor it converts and each K-quant fallback; llama-cpp-python routes
    # that through this logger, mapping ggml's WARN to logging.ERROR (its table predates ggml's
    # current enum), so only CRITICAL silences the fallback lines. The report lists the types
    # actually written instead, and a failure still raises below.
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_QUANT_TYPES[quant]
    params.nthread = threads if threads > 0 else usable_cores()
    keep: list[Any] = []  # ctypes only points at these: they must outlive the call
    if imatrix:
        params.imatrix = _imatrix_entries(llama_cpp, imatrix, keep)
    if metadata:
        params.kv_overrides = _kv_overrides(llama_cpp, metadata, keep)
    if tensor_types:
        params.tt_overrides = _tensor_overrides(llama_cpp, tensor_types, keep)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0 or not Path(dst).is_file():
        raise ModelError(f"{src}: llama.cpp could not quantize to {quant} (llama_model_quantize returned {rc})")


# Each builds one NULL-terminated C array llama_model_quantize_params points at, appending to
# ``keep`` everything the array points into (and the array), so the caller holds them for the call.


def _imatrix_entries(llama_cpp: Any, imatrix: dict[str, Any], keep: list[Any]) -> Any:
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: the NULL terminator
    for i, (name, values) in enumerate(sorted(imatrix.items())):
        arr = np.ascontiguousarray(values, dtype=np.float32)
        keep.append(arr)
        entries[i].name = name.encode()
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    keep.append(entries)
    return ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


def _kv_overrides(llama_cpp: Any, metadata: dict[str, str | int], keep: list[Any]) -> Any:
    kvs = (llama_cpp.llama_model_kv_override * (len(metadata) + 1))()  # empty key ends the list
    for i, (key, value) in enumerate(metadata.items()):
        kvs[i].key = key.encode()
        if isinstance(value, int):
            kvs[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            kvs[i].value.val_i64 = value
        else:
            if len(value.encode()) >= 128:
                raise ValueError(f"GGUF metadata {key}: {value!r} is longer than llama.cpp's 127 bytes")
            kvs[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            kvs[i].value.val_str = value.encode()
    keep.append(kvs)
    return ctypes.cast(kvs, ctypes.POINTER(llama_cpp.llama_model_kv_override))


def _tensor_overrides(llama_cpp: Any, tensor_types: dict[str, str], keep: list[Any]) -> Any:
    # llama.cpp matches each tensor name against these regexes (std::regex_search), first match
    # wins: anchored, escaped names make each one apply to exactly its tensor.
    overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()  # NULL pattern ends it
    for i, (name, type_name) in enumerate(sorted(tensor_types.items())):
        pattern = f"^{re.escape(name)}$".encode()
        keep.append(pattern)
        overrides[i].pattern = pattern
        overrides[i].type = TENSOR_TYPES[type_name][0]
    keep.append(overrides)
    return ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
