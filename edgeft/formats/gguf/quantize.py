"""Stage `quantize` for GGUF: llama.cpp's own quantizer through its C API.

llama-cpp-python ships no ``llama-quantize`` binary, so we call ``llama_model_quantize`` directly.
The requested type is a *mix*: llama.cpp chooses per-tensor types (and falls back when a row width is
not a multiple of a K-quant's 256-value block), so the stage records the tensor types actually
written, read back from the file.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError, ModelError
from ...stage import StageOutput, content_hash, run_stage
from .inspect import GGUF_FILE, check_gguf, tensor_type_counts
from .types import GGUF_QUANT_TYPES


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
    keep = []  # ctypes only points at these: they must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed: the NULL terminator
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if metadata:
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
        params.kv_overrides = ctypes.cast(kvs, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    if tensor_types:
        from .mixed import TENSOR_TYPES

        # llama.cpp matches each tensor name against these regexes (std::regex_search), first match
        # wins: anchored, escaped names make each one apply to exactly its tensor.
        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()  # NULL pattern ends it
        for i, (name, type_name) in enumerate(sorted(tensor_types.items())):
            pattern = f"^{re.escape(name)}$".encode()
            keep.append(pattern)
            overrides[i].pattern = pattern
            overrides[i].type = TENSOR_TYPES[type_name][0]
        keep.append(overrides)
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0 or not Path(dst).is_file():
        raise ModelError(f"{src}: llama.cpp could not quantize to {quant} (llama_model_quantize returned {rc})")


def quantize(
    gguf_dir: Path,
    out_dir: Path,
    quant: str,
    threads: int = 0,
    imatrix_dir: Path | None = None,
    sensitivity_dir: Path | None = None,
    max_size_mb: float | None = None,
) -> StageOutput:
    """Cached stage: ``gguf_dir/model.gguf`` → ``out_dir/model.gguf`` in type ``quant``, weighted by
    ``imatrix_dir``'s importance matrix when given (its hash and its calibration set's go into the
    GGUF header and the manifest). With ``sensitivity_dir`` (see :mod:`.mixed`), every tensor gets
    the type of a plan that fits ``max_size_mb``."""
    from . import imatrix as im
    from . import mixed

    src = Path(gguf_dir) / GGUF_FILE
    if not src.is_file():
        raise ModelError(f"{gguf_dir}: expected an exported {GGUF_FILE} there")
    check_gguf(src)  # llama.cpp's quantizer reads it next: every count checked against the file
    inputs = {"gguf": content_hash(gguf_dir)}
    params: dict[str, Any] = {"quant": quant}
    matrix, metadata, provenance = None, None, {}
    tensor_types, plan, sensitivity = None, None, {}
    if sensitivity_dir is not None:
        import json

        from ...precision_plan import plan as choose

        if max_size_mb is None:
            raise ConfigError("a mixed-precision quantization needs max_size_mb")
        inputs["sensitivity"] = content_hash(sensitivity_dir)
        params["max_size_mb"] = max_size_mb
        sensitivity = json.loads((Path(sensitivity_dir) / mixed.SENSITIVITY_FILE).read_text())
        plan = choose(sensitivity, int(max_size_mb * 1e6))
        tensor_types = mixed.assign(mixed.Layout.of(src), plan["levels"])
    if imatrix_dir is not None:
        from ...stage import read_manifest

        inputs["imatrix"] = content_hash(imatrix_dir)
        matrix = im.read(Path(imatrix_dir) / im.IMATRIX_FILE)
        im.check_matches(matrix, src, Path(imatrix_dir) / im.IMATRIX_FILE)
        # a planned mix was measured with the matrix on every tensor, so it is quantized that way
        scope = "all"
        if tensor_types is None:
            matrix, scope = im.scope(matrix, src, quant)
        params["imatrix_tensors"] = scope
        made = (read_manifest(imatrix_dir) or {}).get("results", {})
        calib = made.get("calibration") or {}
        provenance = {
            "imatrix_tensors": {"rule": scope, "count": len(matrix)},
            "imatrix_sha256": made.get("imatrix_sha256"),
            "calibration_sha256": calib.get("sha256"),
            "calibration_source": calib.get("source"),
        }
        # the keys llama-quantize writes, plus the two hashes that say exactly what was used
        metadata = {
            "quantize.imatrix.file": im.IMATRIX_FILE,
            "quantize.imatrix.dataset": f"edgeft calibration {calib.get('source')}",
            "quantize.imatrix.entries_count": len(matrix),
            "quantize.imatrix.chunks_count": int(calib.get("chunks") or 0),
            "edgeft.imatrix.sha256": str(provenance["imatrix_sha256"]),
            "edgeft.calibration.sha256": str(provenance["calibration_sha256"]),
        }

    def work(tmp: Path) -> dict[str, Any]:
        out = tmp / GGUF_FILE
        quantize_file(src, out, quant, threads, imatrix=matrix, metadata=metadata, tensor_types=tensor_types)
        size = out.stat().st_size
        results: dict[str, Any] = {"tensor_types": tensor_type_counts(out), "size_bytes": size, **provenance}
        if plan is not None:
            if size > plan["max_bytes"]:  # the plan's sizes come from the shapes: a bug, not bad input
                raise RuntimeError(f"mixed plan predicted {plan['predicted_bytes']} bytes, llama.cpp wrote {size}")
            # the written file scored on the sweep's own tokens, beside what the sweep predicted for it
            measured = mixed.confirm(out, sensitivity_dir, threads)
            if measured is not None:
                predicted = sensitivity["base_kld"] + plan["predicted_added_kld"]
                results["mixed"] = {**plan, "predicted_kld": predicted, "measured_kld": measured}
            else:
                results["mixed"] = plan
        return results

    return run_stage(out_dir, "quantize", inputs, params, work)
