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
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError
from .loading import parse_json, read_json

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
# Bits per element of every dtype the safetensors format defines (those it reads, as of 0.8), for
# the byte-range check; the 4- and 6-bit floats are packed.
DTYPE_BITS: dict[str, int] = {
    **{name: 8 * size for name, (size, _) in DTYPES.items()},
    "U16": 16,
    "U32": 32,
    "U64": 64,
    "C64": 64,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F4": 4,
}

_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header
_MAX_RANK = 64  # more dimensions than any tensor has; a longer shape list is not a tensor's


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
        header = parse_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_size = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, info in tensors.items():
        _check_entry(path, name, info, data_size)
    _check_layout(path, tensors, data_size)
    return tensors, 8 + n


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(path: Path, name: str, info: Any, data_size: int) -> None:
    """One header entry: a known dtype, a shape of non-negative integers, integer offsets whose
    range holds exactly the shape's bytes and lies inside the data section."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise ModelError(f"{path}: tensor {name}: malformed header entry (expected dtype, shape, data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ModelError(
            f"{path}: tensor {name}: dtype {str(dtype)[:40]!r} is not a safetensors dtype edgeft knows "
            f"(expected one of {', '.join(DTYPE_BITS)})"
        )
    if not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(_is_count(d) for d in shape):
        raise ModelError(f"{path}: tensor {name}: shape {str(shape)[:80]}: expected a list of integers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ModelError(
            f"{path}: tensor {name}: data_offsets {str(offsets)[:80]}: expected [begin, end], integers >= 0"
        )
    begin, end = offsets
    # Python integers: a shape of 2**64 elements is a number to compare, not an overflow.
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    expected = bits // 8
    if end > data_size:
        raise ModelError(f"{path}: truncated: tensor {name} ends at byte {end} of {data_size} data bytes")
    if end < begin or end - begin != expected or bits % 8:
        raise ModelError(f"{path}: tensor {name}: {end - begin} bytes for {dtype} {shape} (expected {expected})")


def _check_layout(path: Path, tensors: dict[str, dict[str, Any]], data_size: int) -> None:
    """Tensors tile the data section, as the format requires (safetensors refuses anything else):
    no two share a byte, there is no gap, and nothing follows the last one."""
    at = 0
    for name, info in sorted(tensors.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = info["data_offsets"]
        if begin < at:
            raise ModelError(
                f"{path}: tensor {name}: bytes {begin}-{end} overlap another tensor's (which ends at {at})"
            )
        if begin > at:
            raise ModelError(f"{path}: tensor {name}: starts at byte {begin}; bytes {at}-{begin} belong to no tensor")
        at = end
    if at != data_size:
        raise ModelError(f"{path}: {data_size - at} bytes after the last tensor belong to no tensor")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder (all shards), each header checked."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(read_json(index)["weight_map"].values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index}: not a valid safetensors index (expected a 'weight_map' object)") from None
        # A shard is a file of this folder: loaders open what the index names, so "../x" or an
        # absolute path would send them outside it, past the header checks below.
        for shard in sorted(shards, key=str):
            if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise ModelError(
                    f"{index}: shard {str(shard)[:80]!r}: expected a .safetensors file name in {model_dir}"
                )
        missing = sorted(s for s in shards if not (model_dir / s).is_file())
        if missing:
            raise ModelError(f"{index}: shard {missing[0]} is missing")
    for f in files:
        read_header(f)
    return files


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {name: tuple(info["shape"]) for name, info in read_header(path).items()}


_SCAN_BYTES = 64 << 20  # read a chunk at a time into one reused buffer


def first_nonfinite(path: Path) -> str | None:
    """Name of the first tensor of a safetensors file holding NaN or Inf, or None.

    Reads the data in 64 MB chunks into one reused buffer (about a second per 500 MB). Not a memory
    map: its pages stay in this process's RSS until the whole file is scanned, so a 2 GB shard
    would cost 2 GB of RSS before the model is even loaded.
    """
    header, start = _read_header(Path(path))
    if not header:
        return None
    buf = np.empty(_SCAN_BYTES, dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = info["dtype"]
            if dtype not in ("F64", "F32", "F16", "BF16"):
                continue
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            left = end - begin
            while left > 0:
                n = f.readinto(memoryview(buf)[: min(left, _SCAN_BYTES)])
                if not n:
                    raise ModelError(f"{path}: truncated inside tensor {name}")
                left -= n
                values = buf[:n].view(DTYPES[dtype][1])  # chunks are whole elements: 64 MB and offsets align
                if dtype in _EXPONENT_BITS:
                    bad = np.any((values & _EXPONENT_BITS[dtype]) == _EXPONENT_BITS[dtype])
                else:
                    bad = not np.isfinite(values).all()
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
