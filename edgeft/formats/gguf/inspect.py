"""Reading a GGUF artifact without running it: header check, size, tensor types, bytes per token."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ...errors import ModelError
from ...loading import loading
from .header import check_gguf_layout
from .types import GGUF_QUANT_TYPES

GGUF_FILE = "model.gguf"  # the artifact inside a GGUF stage folder

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


def find_artifact(path: Path) -> Path | None:
    """The GGUF file ``path`` names (a .gguf file, or a folder holding model.gguf), else None."""
    path = Path(path)
    if path.is_dir():
        return path / GGUF_FILE if (path / GGUF_FILE).is_file() else None
    if path.suffix == ".gguf":
        return path
    if path.is_file():
        with open(path, "rb") as f:  # sniff the magic; never read a whole model to look at 4 bytes
            if f.read(4) == _GGUF_MAGIC:
                return path
    return None


def check_gguf(path: Path) -> None:
    """Magic and version, then every count, length and offset of the header against the file
    (:mod:`.header`): what passes can be handed to gguf-py or llama.cpp without it reading past the
    end or allocating what the file only claims to hold."""
    check_gguf_header(path)
    check_gguf_layout(path)


def read_gguf(path: Path):
    """gguf-py's reader over ``path``; a file it cannot parse is a ModelError naming it."""
    from gguf import GGUFReader

    check_gguf(path)
    with loading(path, "GGUF"):
        return GGUFReader(path)


def _int_field(reader, key: str, path: Path) -> int | None:
    """An integer metadata value, None when absent; another type is the file's error, not a crash."""
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"{path}: GGUF metadata {key}: expected an integer, got {str(value)[:40]!r}")
    return value


def tensor_type_counts(path: Path, reader=None) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds, e.g. ``{"Q5_0": 166, "F32": 61}``."""
    reader = reader or read_gguf(path)
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def describe(path: Path, reader=None) -> dict[str, Any]:
    """Size, tensor-type mix, the file type llama.cpp recorded (``general.file_type``) and weight
    bytes read per decoded token; the file is parsed once (gguf-py walks the vocabulary, ~2.5 s)."""
    from gguf import Keys

    reader = reader or read_gguf(path)
    ftype = _int_field(reader, Keys.General.FILE_TYPE, path)
    names = {v: k for k, v in GGUF_QUANT_TYPES.items()}
    return {
        "size_bytes": Path(path).stat().st_size,
        "tensor_types": tensor_type_counts(path, reader),
        "file_type": names.get(ftype, f"ftype {ftype}"),
        "bytes_per_token": bytes_per_token(path, reader),
    }


def bytes_per_token(path: Path, reader=None) -> int:
    """Weight bytes read to decode one token from the GGUF file at ``path`` (an upper-bound input:
    every tensor once; KV cache and activations not counted).

    The embedding lookup reads one row of ``token_embd.weight``; when the file has no
    ``output.weight`` the embedding is also the output layer and is read whole.
    """
    tensors = (reader or read_gguf(path)).tensors  # pass a reader to skip a ~2.5 s re-parse
    tied = not any(t.name == "output.weight" for t in tensors)
    total = 0
    for t in tensors:
        n_bytes = int(t.n_bytes)
        if t.name == "token_embd.weight" and not tied and int(t.n_elements):
            rows = int(t.n_elements) // int(t.shape[0])  # shape[0] is the row length (ggml's ne0)
            n_bytes //= rows
        total += n_bytes
    return total


def kv_bytes_per_token(path: Path, reader=None) -> int | None:
    """KV-cache bytes one context token costs in llama.cpp's default f16 cache (K and V, every layer);
    None when the file does not say (an architecture without these keys)."""
    reader = reader or read_gguf(path)

    def value(key: str) -> int | None:
        return _int_field(reader, key, path)

    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if not isinstance(arch, str):
        return None
    layers, heads = value(f"{arch}.block_count"), value(f"{arch}.attention.head_count")
    kv_heads, width = value(f"{arch}.attention.head_count_kv") or heads, value(f"{arch}.embedding_length")
    if not (layers and heads and kv_heads and width):
        return None
    k_len = value(f"{arch}.attention.key_length") or width // heads
    v_len = value(f"{arch}.attention.value_length") or width // heads
    return layers * kv_heads * (k_len + v_len) * 2
