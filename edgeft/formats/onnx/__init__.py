"""ONNX for onnxruntime / onnxruntime-genai apps: exported and quantized in one builder pass.

The format surface is described in :mod:`edgeft.formats`; the artifact is a folder (see
:mod:`.inspect`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ...errors import ConfigError
from .inspect import check_artifact, describe, find_artifact
from .types import KNOBS, PRECISIONS

NAME = "onnx"
RUNTIME = "onnxruntime-genai"
TARGET_KEYS: tuple[str, ...] = tuple(KNOBS)
ARTIFACT_HINT = "an onnxruntime-genai folder (genai_config.json, model.onnx)"
CONVERSION = "onnx-fp32"

__all__ = ["check_artifact", "describe", "find_artifact"]

Run = Callable[[str, Callable[[], Any]], Any]


def check_target(name: str, quant: str, options: dict[str, Any], where: str) -> None:
    if quant not in PRECISIONS:
        raise ConfigError(f"{where}: quant: expected one of {', '.join(PRECISIONS)}, got {quant!r}")
    for key, value in options.items():
        allowed = KNOBS[key][0]
        if isinstance(value, bool) != isinstance(allowed[0], bool) or value not in allowed:
            raise ConfigError(f"{where}: {key}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
    if quant == "fp32" and options:
        raise ConfigError(f"{where}: {sorted(options)[0]}: fp32 targets take no quantization options")
    if options.get("shared_embeddings") and quant != "int4":
        raise ConfigError(f"{where}: shared_embeddings: only int4 can quantize the embedding with the head")


def bytes_per_token(folder: Path) -> int:
    return describe(folder)["bytes_per_token"]


def kv_bytes_per_token(folder: Path) -> int | None:
    """KV-cache bytes per context token: the builder's CPU graphs keep past keys/values in fp32."""
    from .inspect import genai_config

    d = genai_config(folder)["model"]["decoder"]
    try:
        return int(d["num_hidden_layers"]) * int(d["num_key_value_heads"]) * int(d["head_size"]) * 2 * 4
    except (KeyError, TypeError, ValueError):
        return None


def conversion(merged_dir: Path, out_dir: Path, run: Run) -> tuple[str, Path]:
    from .export import export

    out = run(f"export {CONVERSION}", lambda: export(merged_dir, Path(out_dir) / CONVERSION, "fp32", {}))
    return CONVERSION, out.path


def build(target, merged_dir: Path, out_dir: Path, run: Run, threads: int, calibration=None, progress=None) -> Path:
    """``target``'s onnxruntime-genai folder: export and quantization are one builder run
    (``calibration`` is unused: the builder's quantizers here take no calibration data; nor is
    ``progress``: the builder reports nothing step by step)."""
    from .export import export

    if target.quant == "fp32" and not target.options:
        return conversion(merged_dir, out_dir, run)[1]
    out = run(
        f"export {target.name}",
        lambda: export(merged_dir, Path(out_dir) / target.name, target.quant, dict(target.options)),
    )
    return out.path
