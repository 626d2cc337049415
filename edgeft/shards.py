"""Safetensors weights read and written one tensor at a time, so memory holds one tensor, not a model.

Reading: :func:`read_tensor` copies one tensor's bytes into a fresh torch tensor with plain file
reads at the offsets of the header (:func:`edgeft.weights.read_header`). Not ``safe_open``: it maps
the whole file, and every page a read touches stays resident (and counts in the process's RSS) until
the file is closed, so streaming a 1 GB shard through one ``safe_open`` showed 1 GB more RSS at the
end (measured: 0.23 → 1.25 GB for 16 tensors of 64 MB, read and dropped one by one).

Writing: :func:`write_shards` lays tensors out in shards of at most ``max_bytes`` (a larger tensor
gets a shard of its own) with the names and index Hugging Face uses: ``model.safetensors`` when one
shard holds everything, else ``model-0000K-of-0000N.safetensors`` and ``model.safetensors.index.json``.
Every shard's header is known before any data is computed (names, dtypes, shapes), so the header is
written first and each tensor's bytes follow as it is produced.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import ModelError
from .weights import read_header

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 << 30  # 2 GiB: a shard is written and hashed in one go; 16 of them for an 8B in fp32
READ_BLOCK_BYTES = 64 << 20  # stored bytes converted at a time when a tensor is read in another dtype

# safetensors dtype → (torch dtype name, bytes per element)
TORCH_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a safetensors file lies: enough to read it without the file's other tensors."""

    path: Path
    name: str
    dtype: str  # safetensors name: F32, BF16, ...
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int


def stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file, header checked against the file size (no data read)."""
    header = read_header(path)  # checks every entry against the file's size
    with open(path, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
    return {
        name: StoredTensor(
            Path(path),
            name,
            info["dtype"],
            tuple(info["shape"]),
            start + info["data_offsets"][0],
            info["data_offsets"][1] - info["data_offsets"][0],
        )
        for name, info in header.items()
    }


def read_tensor(t: StoredTensor, dtype: Any = None) -> Any:
    """A fresh, writable torch tensor holding ``t``'s data (plain reads, no memory map), in ``dtype``
    when given: converted a block of :data:`READ_BLOCK_BYTES` at a time, so a bf16 tensor read as
    fp32 needs its fp32 copy and one block, not both copies whole. Same values as ``.to(dtype)``."""
    import torch

    if t.dtype not in TORCH_DTYPES:
        raise ModelError(f"{t.path}: tensor {t.name}: dtype {t.dtype} is not read here")
    stored = getattr(torch, TORCH_DTYPES[t.dtype][0])
    out = torch.empty(t.shape, dtype=dtype or stored)
    flat = out.view(-1)
    try:
        with open(t.path, "rb", buffering=0) as f:
            f.seek(t.begin)
            if out.dtype == stored:
                got = _read_into(f, flat)
            else:
                got, step = 0, max(1, READ_BLOCK_BYTES // TORCH_DTYPES[t.dtype][1])
                buf = torch.empty(min(step, flat.numel()), dtype=stored)
                for i in range(0, flat.numel(), step):
                    n = min(step, flat.numel() - i)
                    got += _read_into(f, buf[:n])
                    flat[i : i + n].copy_(buf[:n])
    except OSError as e:
        raise ModelError(f"{t.path}: cannot read tensor {t.name} ({e.strerror or e})") from None
    if got != t.nbytes:
        raise ModelError(f"{t.path}: truncated: tensor {t.name} has {got} of its {t.nbytes} bytes")
    return out


def _read_into(f: Any, flat: Any) -> int:
    """Fill the 1-D contiguous tensor ``flat`` from the file's position; the number of bytes read."""
    import torch

    view = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
    got = 0
    while got < len(view):  # an unbuffered read may return less than asked
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


@dataclass(frozen=True)
class OutTensor:
    """A tensor to be written: name, safetensors dtype, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return TORCH_DTYPES[self.dtype][1] * math.prod(self.shape)


def plan_shards(tensors: list[OutTensor], max_bytes: int = MAX_SHARD_BYTES) -> list[list[OutTensor]]:
    """Consecutive groups of at most ``max_bytes`` (a tensor larger than that alone in its group)."""
    shards: list[list[OutTensor]] = []
    size = 0
    for t in tensors:
        if not shards or (size + t.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards or [[]]


def shard_names(n: int) -> list[str]:
    return [SINGLE] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def write_shards(
    out_dir: Path,
    tensors: list[OutTensor],
    produce: Callable[[OutTensor], Any],
    max_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``produce(t)`` (a torch tensor of t's dtype and shape) for every ``t`` in order, into
    shards of ``out_dir``; returns the shard file names. One produced tensor is held at a time."""
    import torch

    shards = plan_shards(tensors, max_bytes)
    names = shard_names(len(shards))
    weight_map = {}
    for name, shard in zip(names, shards):
        with open(Path(out_dir) / name, "wb") as f:
            f.write(_header(shard))
            for t in shard:
                value = produce(t)
                want = getattr(torch, TORCH_DTYPES[t.dtype][0])
                if value.dtype != want or tuple(value.shape) != t.shape:  # our bug, not the user's
                    raise AssertionError(
                        f"{t.name}: produced {value.dtype} {tuple(value.shape)}, planned {want} {t.shape}"
                    )
                if t.nbytes:
                    f.write(memoryview(value.contiguous().view(-1).view(torch.uint8).numpy()))
                weight_map[t.name] = name
                del value
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (Path(out_dir) / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _header(shard: list[OutTensor]) -> bytes:
    """8-byte length + JSON header (padded with spaces to a multiple of 8, as safetensors writes it)."""
    table: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        table[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw
