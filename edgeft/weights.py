"""Safetensors weight files, read without torch: header checks, shapes and a non-finite scan.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, offsets relative to the end of the
header) and the raw tensor bytes. Reading that much is enough to refuse a truncated or garbage
file in milliseconds, before transformers or peft get to fail on it with a traceback, and to scan
the data for NaN/Inf through a memory map (no copy of the model in memory, no torch).
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError

# safetensors dtype → (bytes per element, numpy view used to look for NaN/Inf).
# Half-precision and bf16 are viewed as unsigned ints: a value is NaN or Inf exactly when all of its
# exponent bits are set, which needs no float conversion (numpy has no bf16).
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "<f8"),
    "F32": (4, "<f4"),
    "F16": (2, "<u2"),
    "BF16": (2, "<u2"),
    "I64": (8, "<i8"),
    "I32": (4, "<i4"),
    "I16": (2, "<i2"),
    "I8": (1, "i1"),
    "U8": (1, "u1"),
    "BOOL": (1, "u1"),
}
_EXPONENT_BITS = {"F16": 0x7C00, "BF16": 0x7F80}

_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file, checked against the file's size.

    Raises ModelError naming the file when it is truncated, its header is not the format's, or a
    tensor's byte range does not match its dtype and shape.
    """
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """(tensor table, byte offset of the data section)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ModelError(
                    f"{path}: not a safetensors file, or truncated (header of {n} bytes in a {size}-byte file)"
                )
            raw = f.read(n)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_size = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, info in tensors.items():
        _check_entry(path, name, info, data_size)
    return tensors, 8 + n


def _check_entry(path: Path, name: str, info: Any, data_size: int) -> None:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise ModelError(f"{path}: tensor {name}: malformed header entry") from None
    if dtype not in DTYPES:
        return  # a dtype we do not scan (e.g. F8); transformers decides whether it can load it
    expected = DTYPES[dtype][0] * int(np.prod(shape, dtype=np.int64))
    if end > data_size:
        raise ModelError(f"{path}: truncated: tensor {name} ends at byte {end} of {data_size} data bytes")
    if end - begin != expected or begin < 0:
        raise ModelError(f"{path}: tensor {name}: {end - begin} bytes for {dtype} {shape} (expected {expected})")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder (all shards), each header checked."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index}: not a valid safetensors index (expected a 'weight_map' object)") from None
        missing = sorted(s for s in shards if not (model_dir / s).is_file())
        if missing:
            raise ModelError(f"{index}: shard {missing[0]} is missing")
    for f in files:
        read_header(f)
    return files


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {name: tuple(info["shape"]) for name, info in read_header(path).items()}


def first_nonfinite(path: Path) -> str | None:
    """Name of the first tensor of a safetensors file holding NaN or Inf, or None.

    Reads through a memory map in chunks: a 500 MB model is scanned in about a second.
    """
    header, start = _read_header(Path(path))
    if not header:
        return None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = info["dtype"]
        if dtype not in ("F64", "F32", "F16", "BF16"):
            continue
        begin, end = info["data_offsets"]
        values = data[begin:end].view(DTYPES[dtype][1])
        for i in range(0, values.size, 1 << 24):
            chunk = values[i : i + (1 << 24)]
            if dtype in _EXPONENT_BITS:
                bad = np.any((chunk & _EXPONENT_BITS[dtype]) == _EXPONENT_BITS[dtype])
            else:
                bad = not np.isfinite(chunk).all()
            if bad:
                return name
    return None


@functools.cache
def _first_nonfinite_cached(path: Path, size: int, mtime_ns: int) -> str | None:
    del size, mtime_ns  # only part of the cache key: a replaced file is scanned again
    return first_nonfinite(path)


def check_finite_weights(model_dir: Path) -> None:
    """Raise ModelError naming the first tensor (and file) of a model folder that holds NaN/Inf.

    A command checks its inputs up front and its stages resolve the same folder again; each file
    is scanned once per process (keyed by path, size and mtime).
    """
    for f in weight_files(model_dir):
        st = f.stat()
        bad = _first_nonfinite_cached(f.resolve(), st.st_size, st.st_mtime_ns)
        if bad is not None:
            raise ModelError(f"{f}: tensor {bad} holds NaN or Inf values; the model is broken")
