"""One quantized file per mix level, and what the sensitivity sweep builds from them.

llama.cpp quantizes every tensor on its own, from the tensor, its type and its importance-matrix row,
so a tensor's bytes in a file with *every* tensor at type T are its bytes at T in any mix (a test
compares whole files). So the sweep quantizes the F32 export once per mix level and then:

* :func:`assemble` writes a probe file by copying each tensor's raw bytes from the level file it
  should come from: the same bytes, header and layout llama.cpp's own mixed quantization writes,
  without quantizing anything again;
* :func:`weighted_errors` dequantizes each level file's tensors (ggml's own ``to_float``, through
  the ``libggml`` llama-cpp-python ships) against the F32 weights, and returns the rounding error per
  input column (and per row), which activation statistics turn into a layer-local error estimate.

Tensors are read a block of rows at a time into fresh memory and copied file to file by the kernel:
nothing maps or holds a whole model.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ...errors import ModelError

_ROW_BLOCK = 1 << 22  # values per block of rows when dequantizing (16 MB of float32)


@dataclass
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row width
    type: int  # ggml_type
    nbytes: int
    offset: int  # of its data in the file
    path: Path

    def read(self, start: int = 0, size: int | None = None) -> np.ndarray:
        """``size`` bytes of the tensor's data from byte ``start`` (all of it by default), read into
        fresh memory: nothing stays mapped, so a sweep's memory is what it holds, not what it read."""
        size = self.nbytes - start if size is None else size
        out = np.empty(size, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.offset + start)
            if f.readinto(memoryview(out)) != size:
                raise ModelError(f"{self.path}: {self.name} is truncated")
        return out


class GGUFFile:
    """A GGUF file's raw layout: the header's key-value section as bytes, and every tensor's info.
    Enough to copy tensors between files written by the same quantizer."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        reader = GGUFReader(self.path)  # memory-maps the file: only the header is touched here
        self.alignment = int(reader.alignment)
        self.version = int(reader.fields["GGUF.version"].parts[0][0])
        self.kv_count = int(reader.fields["GGUF.kv_count"].parts[0][0])
        kv_start = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
        first = reader.tensors[0].field.offset if reader.tensors else reader.data_offset
        self.kv_bytes = bytes(reader.data[kv_start:first])
        self.tensors = {
            t.name: TensorInfo(
                t.name,
                tuple(int(x) for x in t.shape),
                int(t.tensor_type),
                int(t.n_bytes),
                int(t.data_offset),
                self.path,
            )
            for t in reader.tensors
        }
        del reader


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


def _gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def assemble(template: GGUFFile, sources: dict[str, GGUFFile], dst: Path) -> None:
    """Write ``dst``: ``template``'s header and metadata, each tensor (in ``template``'s order) with
    the type and bytes it has in ``sources[name]`` (``template``'s own when not named).

    The layout is llama.cpp's (gguf.cpp): tensor infos in order, data offsets aligned, each
    tensor's data padded with zeros to the alignment. Tensor bytes go file to file in the kernel
    (``os.sendfile``), never through this process's memory."""
    infos, offset = [], 0
    for name, t in template.tensors.items():
        src = sources.get(name, template).tensors[name]
        if src.dims != t.dims:
            raise ModelError(f"{src.path}: {name} has shape {src.dims}, {template.path} {t.dims}")
        infos.append((src, offset))
        offset += src.nbytes + _pad(src.nbytes, template.alignment)
    inputs = {p: open(p, "rb") for p in {src.path for src, _ in infos}}
    try:
        with open(dst, "wb") as f:
            f.write(b"GGUF" + struct.pack("<IQQ", template.version, len(infos), template.kv_count))
            f.write(template.kv_bytes)
            for src, off in infos:
                f.write(_gguf_string(src.name) + struct.pack("<I", len(src.dims)))
                f.write(struct.pack(f"<{len(src.dims)}QIQ", *src.dims, src.type, off))
            f.write(b"\0" * _pad(f.tell(), template.alignment))
            f.flush()
            for src, _ in infos:
                _copy(inputs[src.path], src.offset, src.nbytes, f)
                f.write(b"\0" * _pad(src.nbytes, template.alignment))
                f.flush()
    finally:
        for handle in inputs.values():
            handle.close()


def _copy(src: Any, offset: int, size: int, dst: Any) -> None:
    done = 0
    while done < size:
        sent = os.sendfile(dst.fileno(), src.fileno(), offset + done, size - done)
        if sent == 0:
            raise ModelError(f"{src.name}: ended {size - done} bytes early")
        done += sent


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` (ggml.h)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)),
        ("from_float_ref", ctypes.c_void_p),
    ]


def _to_float(ggml_type: int) -> Any:
    from llama_cpp._ggml import libggml

    libggml.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    libggml.ggml_get_type_traits.argtypes = [ctypes.c_int]
    traits = libggml.ggml_get_type_traits(ggml_type).contents
    if not traits.to_float:
        raise ModelError(f"ggml type {traits.type_name.decode()} has no dequantizer")
    return traits.to_float, int(traits.blck_size), int(traits.type_size)


def dequantized_rows(t: TensorInfo, max_values: int = _ROW_BLOCK) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, float32 [rows, width]) blocks of a 2-D (or stacked) tensor, dequantized by ggml's own
    ``to_float`` (F32 is read as it is); the view is reused by the next block."""
    width = t.dims[0]
    n_rows = int(np.prod(t.dims[1:]))
    step = max(1, max_values // width)
    if t.type == 0:  # F32
        for i in range(0, n_rows, step):
            rows = slice(i, min(n_rows, i + step))
            yield rows, t.read(4 * width * i, 4 * width * (rows.stop - i)).view(np.float32).reshape(-1, width)
        return
    to_float, block, size = _to_float(t.type)
    row_bytes = width // block * size
    out = np.empty((step, width), dtype=np.float32)
    for i in range(0, n_rows, step):
        rows = slice(i, min(n_rows, i + step))
        n = rows.stop - rows.start
        chunk = t.read(row_bytes * i, row_bytes * n)
        to_float(chunk.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n * width)
        yield rows, out[:n]


@dataclass
class RoundingError:
    """A tensor's squared rounding error at one level against the F32 weights, summed per input
    column (over rows) and per row (over columns)."""

    columns: np.ndarray  # float64 [width]
    rows: np.ndarray  # float64 [rows]


def weighted_errors(f32: TensorInfo, quantized: TensorInfo) -> RoundingError:
    """The rounding error of ``quantized`` (a level file's tensor) against ``f32`` (the export's)."""
    if f32.type != 0 or f32.dims != quantized.dims:
        raise ModelError(f"{f32.name}: expected the F32 tensor and a quantized one of the same shape")
    width = f32.dims[0]
    columns = np.zeros(width)
    rows = np.zeros(int(np.prod(f32.dims[1:])))
    for (block, values), (_, exact) in zip(dequantized_rows(quantized), dequantized_rows(f32)):
        sq = np.square(values - exact)
        columns += sq.sum(axis=0, dtype=np.float64)
        rows[block] = sq.sum(axis=1, dtype=np.float64)
    return RoundingError(columns, rows)
