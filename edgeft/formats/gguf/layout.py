"""A GGUF file's quantizable tensors as the mixed-precision path sees them: their shapes, the groups
their sensitivity is measured in, and the bytes each takes at a given type (a level's type falls back
per tensor, as llama.cpp's does, where its blocks do not tile the rows: :data:`.types.FALLBACK`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .inspect import read_gguf
from .types import FALLBACK


def _block(type_name: str) -> tuple[int, int]:
    """(values per block, bytes per block) from gguf-py's table."""
    import gguf  # 0.3-1 s to import (its vocab module pulls mistral_common): not on the CLI's start-up path

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


def resolve(type_name: str, row: int) -> str:
    """The type a tensor with ``row``-wide rows gets for a mix level of ``type_name``."""
    if row % _block(type_name)[0] == 0:
        return type_name
    fallback = FALLBACK.get(type_name, "F16")
    return fallback if row % _block(fallback)[0] == 0 else "F16"


def tensor_bytes(shape: tuple[int, ...], type_name: str) -> int:
    per_block, size = _block(type_name)
    return math.prod(shape) // per_block * size


def group_of(name: str) -> str:
    """Which group a tensor's sensitivity is measured with (see the module docstring)."""
    m = re.match(r"blk\.(\d+)\.(attn|ffn)?", name)
    if m:
        return f"blk.{m.group(1)}.{m.group(2) or 'other'}"
    return name.removesuffix(".weight")


@dataclass
class Layout:
    """The quantizable tensors of an F32 GGUF (2-D weights; norms stay F32) and everything else's bytes."""

    shapes: dict[str, tuple[int, ...]]  # ggml order: shape[0] is the row width
    fixed_bytes: int  # header, metadata, unquantized tensors and alignment, as in the F32 file
    groups: dict[str, list[str]]

    @classmethod
    def of(cls, gguf_path: Path) -> Layout:
        reader = read_gguf(gguf_path)
        shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors if len(t.shape) >= 2}
        planned = sum(int(t.n_bytes) for t in reader.tensors if t.name in shapes)
        groups: dict[str, list[str]] = {}
        for name in shapes:
            groups.setdefault(group_of(name), []).append(name)
        # alignment padding may differ per tensor once sizes change: 32 bytes each, plus room for the
        # few metadata keys quantizing adds
        slack = 32 * len(reader.tensors) + 4096
        return cls(shapes, Path(gguf_path).stat().st_size - planned + slack, groups)

    def types(self, group: str, level: str) -> dict[str, str]:
        return {n: resolve(level, self.shapes[n][0]) for n in self.groups[group]}

    def nbytes(self, types: dict[str, str]) -> int:
        return sum(tensor_bytes(self.shapes[n], t) for n, t in types.items())


def role_of(name: str) -> str | None:
    """A layer tensor's role (``attn_q``, ``ffn_down``, …), the same in every layer; None outside layers."""
    m = re.match(r"blk\.\d+\.(.+?)(?:\.weight)?$", name)
    return m.group(1) if m else None


def layer_of(name: str) -> int:
    return int(name.split(".")[1])


def assign(layout: Layout, levels: dict[str, str]) -> dict[str, str]:
    """Tensor name → type for a plan's group levels."""
    return {n: t for g, level in levels.items() for n, t in layout.types(g, level).items()}
