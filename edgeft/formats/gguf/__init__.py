"""GGUF, llama.cpp's format: our in-process exporter writes F32/F16, llama.cpp's quantizer the rest.

The format surface is described in :mod:`edgeft.formats`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ...errors import ConfigError
from .inspect import GGUF_FILE, bytes_per_token, check_gguf_header, describe, find_artifact, kv_bytes_per_token
from .types import GGUF_QUANT_TYPES, UNQUANTIZED

NAME = "gguf"
RUNTIME = "llama.cpp"
# imatrix = "task" | "general" | "mix": weigh rounding by an importance matrix measured on that
# calibration set (see edgeft/calibration.py and .imatrix)
TARGET_KEYS: tuple[str, ...] = ("imatrix",)
ARTIFACT_HINT = "a .gguf file or a folder holding model.gguf"
CONVERSION = "gguf-f32"  # the unquantized export every quantized type is made from

__all__ = ["bytes_per_token", "describe", "find_artifact", "kv_bytes_per_token", "GGUF_FILE"]

Run = Callable[[str, Callable[[], Any]], Any]


def check_target(name: str, quant: str, options: dict[str, Any], where: str) -> None:
    if quant not in GGUF_QUANT_TYPES:
        raise ConfigError(f"{where}: quant: expected one of {', '.join(GGUF_QUANT_TYPES)}, got {quant!r}")
    if "imatrix" in options:
        from ...calibration import SOURCES

        if options["imatrix"] not in SOURCES:
            raise ConfigError(f"{where}: imatrix: expected one of {', '.join(SOURCES)}, got {options['imatrix']!r}")
        if not needs_quantize(quant):
            raise ConfigError(f"{where}: imatrix: {quant} is not quantized; an importance matrix changes nothing")


def needs_quantize(quant: str) -> bool:
    """F32/F16 come straight out of the exporter; everything else goes through llama.cpp."""
    return quant not in UNQUANTIZED


def check_artifact(path: Path) -> None:
    check_gguf_header(path)


def conversion(merged_dir: Path, out_dir: Path, run: Run) -> tuple[str, Path]:
    from .export import export

    out = run("export", lambda: export(merged_dir, Path(out_dir) / CONVERSION, "f32"))
    return CONVERSION, out.path / GGUF_FILE


def build(target, merged_dir: Path, out_dir: Path, run: Run, threads: int, calibration=None) -> Path:
    """``target``'s GGUF: exported directly (F32/F16) or quantized from the F32 export, weighted by an
    importance matrix when the target names a calibration set (``calibration(source)`` builds it)."""
    from .export import export
    from .quantize import quantize

    if target.quant == "F32":
        return conversion(merged_dir, out_dir, run)[1]
    if not needs_quantize(target.quant):
        outtype = UNQUANTIZED[target.quant]
        out = run(f"export {target.name}", lambda: export(merged_dir, Path(out_dir) / target.name, outtype))
        return out.path / GGUF_FILE
    source = conversion(merged_dir, out_dir, run)[1].parent
    imatrix_dir = None
    if target.options.get("imatrix"):
        from .imatrix import imatrix_stage

        which = target.options["imatrix"]
        if calibration is None:
            raise ConfigError(f"--target {target.name}: imatrix = {which!r} needs a calibration set (a build)")
        calib = calibration(which)
        imatrix_dir = run(
            f"imatrix {which}",
            lambda: imatrix_stage(merged_dir, source, Path(out_dir) / f"imatrix-{which}", calib, threads),
        ).path
    out = run(
        f"quantize {target.name}",
        lambda: quantize(source, Path(out_dir) / target.name, target.quant, threads, imatrix_dir),
    )
    return out.path / GGUF_FILE
