"""A GGUF file's header walked with ``struct`` before any parser trusts its counts.

gguf-py's ``GGUFReader`` believes every count a file declares: a 49-byte file whose one metadata
array claims 2^62 items makes it append numpy views until memory runs out (each item costs it about
a kilobyte and 10 µs, so even an honest-looking million-item array takes a gigabyte). Here every
count and length is checked against the bytes that are actually left in the file, arrays are
capped at a total no real model comes near, and every tensor's bytes must lie inside the data
section, so that what reaches gguf-py (or llama.cpp) is a file whose header can be read in bounded
time and memory. The layout follows the GGUF specification (ggml's docs/gguf.md):

    magic "GGUF" | version u32 | tensor_count u64 | metadata_kv_count u64
    metadata_kv_count × (key: string, value_type u32, value)
    tensor_count × (name: string, n_dims u32, dims u64 × n_dims, ggml_type u32, offset u64)
    padding to general.alignment (default 32) | tensor data

A string is a u64 length and that many UTF-8 bytes; an array is an item type u32, a u64 count and
the items. Offsets are relative to the start of the data section.
"""

from __future__ import annotations

import functools
import mmap
import struct
from pathlib import Path

from ...errors import ModelError

# Metadata value types → their size in bytes (strings and arrays have none).
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_TYPE_NAME = {
    0: "uint8",
    1: "int8",
    2: "uint16",
    3: "int16",
    4: "uint32",
    5: "int32",
    6: "float32",
    7: "bool",
    8: "string",
    9: "array",
    10: "uint64",
    11: "int64",
    12: "float64",
}
_STRING, _ARRAY, _UINT32 = 8, 9, 4

# ggml's GGML_MAX_DIMS: llama.cpp refuses a tensor of more dimensions.
MAX_DIMS = 4
# Items of all metadata arrays of a file together. The largest vocabularies (Gemma 3: 262,144 tokens
# with scores and types; Qwen's and Llama 3's with their merges) stay under a million; at gguf-py's
# ~1 KB per item this cap keeps a hostile file to about 2 GB.
MAX_ARRAY_ITEMS = 1 << 21
MAX_NESTING = 4  # arrays of arrays; the format allows them, no model uses more than one level
MAX_TENSORS = 1 << 16  # a 670B MoE model has under 2,000
MAX_KV = 1 << 16  # models carry dozens
_INT64_MAX = (1 << 63) - 1
# The smallest possible metadata entry (empty key, uint8 value) and tensor info (empty name, 0 dims).
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8


class _Reader:
    """A cursor over the file's bytes that refuses to step past the end, naming what it was reading."""

    def __init__(self, path: Path, buf: mmap.mmap | bytes, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, what: str) -> ModelError:
        return ModelError(f"{self.path}: not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        left = self.size - self.pos
        if n > left:
            raise self.fail(f"{what} needs {n} bytes at byte {self.pos}, but the {self.size}-byte file has {left} left")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> bytes:
        n = self.u64(f"{what} (its length)")
        self.need(n, f"{what} ({n}-byte string)")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw

    def skip_strings(self, count: int, what: str) -> None:
        unpack, buf, size, pos = struct.Struct("<Q").unpack_from, self.buf, self.size, self.pos
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"{what}: string {i} (its length)")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.need(n, f"{what}: string {i} ({n}-byte string)")
            pos += n
        self.pos = pos


def _text(r: _Reader, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise r.fail(f"{what} is not UTF-8 text") from None


def _value(r: _Reader, vtype: int, what: str, budget: list[int], depth: int = 0) -> int | None:
    """Step over one metadata value; returns it when it is a uint32 (general.alignment needs it)."""
    if vtype in _SCALAR_SIZE:
        r.need(_SCALAR_SIZE[vtype], f"{what} ({_TYPE_NAME[vtype]})")
        value = struct.unpack_from("<I", r.buf, r.pos)[0] if vtype == _UINT32 else None
        r.pos += _SCALAR_SIZE[vtype]
        return value
    if vtype == _STRING:
        _text(r, r.string(what), what)
        return None
    if vtype != _ARRAY:
        raise r.fail(f"{what}: unknown value type {vtype} (expected 0-12)")
    if depth >= MAX_NESTING:
        raise r.fail(f"{what}: arrays nested more than {MAX_NESTING} deep")
    itype = r.u32(f"{what}: array item type")
    count = r.u64(f"{what}: array length")
    if itype == _STRING:
        item, kind = 8, "string"  # at least its 8-byte length
    elif itype == _ARRAY:
        item, kind = 12, "array"  # at least its item type and length
    elif itype in _SCALAR_SIZE:
        item, kind = _SCALAR_SIZE[itype], _TYPE_NAME[itype]
    else:
        raise r.fail(f"{what}: unknown array item type {itype} (expected 0-12)")
    r.need(count * item, f"{what}: array of {count} {kind} items")
    if count > budget[0]:
        raise r.fail(
            f"{what}: array of {count} items; edgeft reads at most {MAX_ARRAY_ITEMS} metadata array items in a file"
        )
    budget[0] -= count
    if itype == _STRING:
        r.skip_strings(count, what)
    elif itype == _ARRAY:
        for i in range(count):
            _value(r, _ARRAY, f"{what}[{i}]", budget, depth + 1)
    else:
        r.pos += count * item
    return None


def check_gguf_layout(path: Path) -> None:
    """Raise ModelError naming the file and the field when any count, length, type or offset in
    the header of the GGUF file at ``path`` does not fit the file (magic and version are checked by
    :func:`edgeft.formats.gguf.inspect.check_gguf_header` first). Cached per path, size and mtime."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    _check_cached(path.resolve(), st.st_size, st.st_mtime_ns, str(path))


@functools.cache
def _check_cached(path: Path, size: int, mtime_ns: int, shown: str) -> None:
    del mtime_ns  # only part of the cache key: a replaced file is checked again
    try:
        with open(path, "rb") as f:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _walk(_Reader(Path(shown), buf, min(size, len(buf))))
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        raise ModelError(f"{shown}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _walk(r: _Reader) -> None:
    r.need(8, "magic and version")
    r.pos = 8
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("metadata count")
    if n_kv > MAX_KV:
        raise r.fail(f"metadata count {n_kv} (edgeft reads at most {MAX_KV})")
    r.need(n_kv * _MIN_KV_BYTES, f"{n_kv} metadata entries")
    if n_tensors > MAX_TENSORS:
        raise r.fail(f"tensor count {n_tensors} (edgeft reads at most {MAX_TENSORS})")
    alignment = _walk_metadata(r, n_kv)
    spans = _walk_tensor_infos(r, n_tensors)

    data_start = -(-r.pos // alignment) * alignment
    data_size = r.size - data_start
    for what, offset, n_bytes in spans:
        if offset % alignment:
            raise r.fail(f"{what}: data offset {offset} is not a multiple of the alignment {alignment}")
        if offset + n_bytes > data_size:
            raise r.fail(
                f"{what}: its {n_bytes} bytes at data offset {offset} run past the end of the file "
                f"({max(data_size, 0)} bytes of tensor data)"
            )


def _walk_metadata(r: _Reader, n_kv: int) -> int:
    """Every metadata entry, checked; the data alignment (``general.alignment``, else 32)."""
    alignment = 32
    budget = [MAX_ARRAY_ITEMS]
    keys: set[str] = set()
    for i in range(n_kv):
        key = _text(r, r.string(f"metadata key {i}"), f"metadata key {i}")
        if key in keys:
            raise r.fail(f"metadata key {key!r} appears twice")
        keys.add(key)
        what = f"metadata {key[:80]!r}"
        vtype = r.u32(f"{what}: value type")
        value = _value(r, vtype, what, budget)
        if key == "general.alignment":
            if vtype != _UINT32 or not value or value & (value - 1):
                raise r.fail(f"{what}: expected a uint32 power of two, got type {_TYPE_NAME.get(vtype, vtype)} {value}")
            alignment = value
    return alignment


def _walk_tensor_infos(r: _Reader, n_tensors: int) -> list[tuple[str, int, int]]:
    """Every tensor info, checked: (what, data offset, bytes) each."""
    from gguf.constants import GGML_QUANT_SIZES  # gguf is slow to import: not at the module's top

    r.need(n_tensors * _MIN_TENSOR_BYTES, f"{n_tensors} tensor infos")
    types = {int(t): (t.name, block, size) for t, (block, size) in GGML_QUANT_SIZES.items()}
    names: set[str] = set()
    spans = []
    for i in range(n_tensors):
        name = _text(r, r.string(f"tensor {i} name"), f"tensor {i} name")
        if name in names:
            raise r.fail(f"tensor {name!r} appears twice")
        names.add(name)
        what = f"tensor {name[:80]!r}"
        n_dims = r.u32(f"{what}: dimension count")
        if n_dims > MAX_DIMS:
            raise r.fail(f"{what}: {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [r.u64(f"{what}: dimension {d}") for d in range(n_dims)]
        if any(d > _INT64_MAX for d in dims):
            raise r.fail(f"{what}: dimensions {dims} (each at most 2^63 - 1)")
        ttype = r.u32(f"{what}: type")
        if ttype not in types:
            raise r.fail(f"{what}: unknown ggml type {ttype}")
        offset = r.u64(f"{what}: data offset")
        type_name, block, type_size = types[ttype]
        if dims and dims[0] % block:
            raise r.fail(f"{what}: first dimension {dims[0]} is not a multiple of {type_name}'s block of {block}")
        elements = 1
        for d in dims:
            elements *= d
        spans.append((what, offset, elements // block * type_size))
    return spans
