"""Reading an ONNX artifact folder without running it: completeness check, size, types, bytes per token.

The artifact is the folder an onnxruntime-genai app loads: ``genai_config.json``, the decoder graph
(``model.onnx``) with its weights in external data (``model.onnx.data``: a protobuf may not exceed
2 GB), and the tokenizer files with the chat template. Only the graph is parsed (``onnx.load`` with
``load_external_data=False``, a few hundred KB); the external data is checked by size.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ...errors import ModelError
from ...loading import loading, read_json_object

GENAI_CONFIG = "genai_config.json"
_SKIP = ("manifest.json",)  # edgeft's own, not part of what an app ships


def find_artifact(path: Path) -> Path | None:
    """The ONNX folder ``path`` names (the folder, or its model.onnx), else None."""
    path = Path(path)
    if path.is_dir():
        return path if (path / GENAI_CONFIG).exists() or any(path.glob("*.onnx")) else None
    if path.suffix == ".onnx":
        return path.parent
    return None


def genai_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / GENAI_CONFIG
    config = read_json_object(path, f"{folder}: {GENAI_CONFIG} missing; not an onnxruntime-genai model folder")
    try:
        config["model"]["decoder"]["filename"]
    except (KeyError, TypeError):
        raise ModelError(f"{path}: no model.decoder.filename; not an onnxruntime-genai config") from None
    return config


def _graph(folder: Path):
    import onnx

    name = genai_config(folder)["model"]["decoder"]["filename"]
    path = Path(folder) / name
    if not path.is_file():
        raise ModelError(f"{folder}: {name} missing (named by {GENAI_CONFIG})")
    with loading(path, "the ONNX graph"):
        return onnx.load(str(path), load_external_data=False)


def _external(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _initializer_bytes(folder: Path, model) -> dict[str, int]:
    """Bytes of every initializer; raises ModelError when external data is missing or short."""
    from onnx import TensorProto

    sizes: dict[str, int] = {}
    files: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            ext = _external(t)
            location = ext.get("location", "")
            if location not in files:
                data = Path(folder) / location
                if not data.is_file():
                    raise ModelError(f"{folder}: external data file {location} missing (weights of {t.name})")
                files[location] = data.stat().st_size
            end = int(ext.get("offset", 0)) + int(ext.get("length", 0))
            if end > files[location]:
                raise ModelError(
                    f"{Path(folder) / location}: truncated ({files[location]} bytes, {t.name} ends at {end})"
                )
            sizes[t.name] = int(ext.get("length", 0))
        else:
            sizes[t.name] = t.ByteSize()
    return sizes


def check_artifact(folder: Path) -> None:
    """Config, graph and every byte of external data present; the tokenizer the app needs present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: expected an ONNX model folder")
    _initializer_bytes(folder, _graph(folder))
    if not (folder / "tokenizer.json").is_file():
        raise ModelError(f"{folder}: tokenizer.json missing; an app cannot tokenize without it")


def _quantized_ops(model) -> Counter:
    ops: Counter = Counter()
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            ops[f"{node.op_type} int{bits}"] += 1
    return ops


def describe(folder: Path) -> dict[str, Any]:
    """Size of the shipped folder, quantized-op mix, precision and weight bytes read per token."""
    from onnx import TensorProto

    folder = Path(folder)
    model = _graph(folder)
    sizes = _initializer_bytes(folder, model)
    ops = _quantized_ops(model)
    float_weights = sum(1 for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) > 1)
    types = dict(sorted(ops.items()))
    if float_weights:
        types["fp32 2-D tensors"] = float_weights
    bits = Counter({int(k.rsplit("int", 1)[1]): v for k, v in ops.items() if k.startswith("MatMulNBits")})
    return {
        "size_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name not in _SKIP),
        "tensor_types": types,
        "file_type": f"int{bits.most_common(1)[0][0]}" if bits else "fp32",
        "bytes_per_token": _bytes_per_token(model, sizes),
    }


def _bytes_per_token(model, sizes: dict[str, int]) -> int:
    """Every weight once, except an embedding table used only by its Gather: one row of it."""
    users: Counter = Counter(i for node in model.graph.node for i in node.input if i in sizes)
    total = sum(sizes.values())
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input and users[node.input[0]] == 1:
            table = node.input[0]
            rows = dims[table][0] if dims[table] else 1
            total -= sizes[table] - sizes[table] // max(rows, 1)
    return total
