"""GGUF, llama.cpp's format: our in-process exporter writes F32/F16, llama.cpp's quantizer the rest.

The format surface is described in :mod:`edgeft.formats`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ...calibration import SOURCES
from ...errors import ConfigError
from ...models import resolve_model
from ...resources import BASELINE_BYTES, LADDER_EXPORT_HINT, StageEstimate
from .imatrix import imatrix_stage
from .inspect import GGUF_FILE, bytes_per_token, check_gguf, describe, find_artifact, kv_bytes_per_token
from .mixed import DEFAULT_MIX, Layout, check_budget, check_mix, sensitivity_stage
from .quantize import quantize
from .types import FILE_BITS_PER_WEIGHT, GGUF_QUANT_TYPES, UNQUANTIZED

NAME = "gguf"
RUNTIME = "llama.cpp"
# imatrix = "task" | "general" | "mix": weigh rounding by an importance matrix measured on that
# calibration set (see edgeft/calibration.py and .imatrix)
# max_size_mb (+ mix = [types, low to high]): per-tensor types from measured sensitivity under that
# file size (see .mixed); the sensitivity is measured on the imatrix's calibration set, else "task"
TARGET_KEYS: tuple[str, ...] = ("imatrix", "max_size_mb", "mix")
ARTIFACT_HINT = "a .gguf file or a folder holding model.gguf"
CONVERSION = "gguf-f32"  # the unquantized export every quantized type is made from
# One file; stage folders, bundles and uploads to a device all name it this (the folder is found by it).
ARTIFACT_FILE = GGUF_FILE
# llama.cpp allocates its KV cache for the whole context it is opened with (the bench context), so
# the peak RSS a bench measures is the memory at that context, whatever the request's length.
KV_CACHE_AT_OPEN = True
# Ollama imports a GGUF file: a bundle carries a Modelfile (FROM ./ARTIFACT_FILE) for it.
OLLAMA_MODELFILE = True

__all__ = ["bytes_per_token", "describe", "find_artifact", "kv_bytes_per_token", "GGUF_FILE"]

Run = Callable[[str, Callable[[], Any]], Any]


def check_target(name: str, quant: str, options: dict[str, Any], where: str) -> None:
    if quant not in GGUF_QUANT_TYPES:
        raise ConfigError(f"{where}: quant: expected one of {', '.join(GGUF_QUANT_TYPES)}, got {quant!r}")
    if "imatrix" in options:
        if options["imatrix"] not in SOURCES:
            raise ConfigError(f"{where}: imatrix: expected one of {', '.join(SOURCES)}, got {options['imatrix']!r}")
        if not needs_quantize(quant):
            raise ConfigError(f"{where}: imatrix: {quant} is not quantized; an importance matrix changes nothing")
    if "mix" in options and "max_size_mb" not in options:
        raise ConfigError(f"{where}: mix: needs max_size_mb (the file size the mix is chosen for)")
    if "max_size_mb" in options:
        size = options["max_size_mb"]
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size < float("inf"):
            raise ConfigError(
                f"{where}: max_size_mb: expected a positive number of megabytes (10^6 bytes), got {size!r}"
            )
        if not needs_quantize(quant):
            raise ConfigError(f"{where}: max_size_mb: quant {quant} is not quantized; name the file type, e.g. Q4_K_M")
        if "mix" in options:
            check_mix(options["mix"], where)


def needs_quantize(quant: str) -> bool:
    """F32/F16 come straight out of the exporter; everything else goes through llama.cpp."""
    return quant not in UNQUANTIZED


def check_artifact(path: Path) -> None:
    check_gguf(path)


UNQUANTIZED_TARGETS = "gguf-f32, gguf-f16"


def export_artifact(target, model: str, out_dir: Path) -> tuple[Any, Path]:
    """``edgeft export``: (stage output, artifact) of ``target`` written straight from a model (a
    built-in name or a Hugging Face folder) into ``out_dir``; F32/F16 only, every other type is
    quantized from that by ``edgeft quantize``. Architectures edgeft has no family for go through
    llama.cpp's converter."""
    if needs_quantize(target.quant):
        raise ConfigError(
            f"--target {target.name}: export writes unquantized GGUF ({UNQUANTIZED_TARGETS}); use `edgeft quantize` next"
        )
    from .export import export  # transformers, as in conversion()

    out = export(resolve_model(model, any_architecture=True), out_dir, UNQUANTIZED[target.quant])
    return out, out.path / GGUF_FILE


def quantize_artifact(target, source_dir: Path, out_dir: Path, threads: int) -> tuple[Any, Path]:
    """``edgeft quantize``: (stage output, artifact) of ``target`` quantized from an ``edgeft export``
    folder. A target with an importance matrix or a size budget needs a calibration set: a build."""
    if target.options:
        raise ConfigError(
            f"--target {target.name}: {', '.join(sorted(target.options))} need a calibration set; use `edgeft build`"
        )
    out = quantize(source_dir, out_dir, target.quant, threads)
    return out, out.path / GGUF_FILE


def conversion(merged_dir: Path, out_dir: Path, run: Run) -> tuple[str, Path]:
    # export.py imports transformers (llama.cpp's converter fallback); a device benches without it
    from .export import export

    out = run("export", lambda: export(merged_dir, Path(out_dir) / CONVERSION, "f32"))
    return CONVERSION, out.path / GGUF_FILE


def build(target, merged_dir: Path, out_dir: Path, run: Run, threads: int, calibration=None, progress=None) -> Path:
    """``target``'s GGUF: exported directly (F32/F16) or quantized from the F32 export, weighted by an
    importance matrix when the target names a calibration set (``calibration(source)`` builds it),
    with per-tensor types from a sensitivity sweep when it sets ``max_size_mb``."""
    from .export import export  # transformers, as in conversion()

    if target.quant == "F32":
        return conversion(merged_dir, out_dir, run)[1]
    if not needs_quantize(target.quant):
        outtype = UNQUANTIZED[target.quant]
        out = run(f"export {target.name}", lambda: export(merged_dir, Path(out_dir) / target.name, outtype))
        return out.path / GGUF_FILE
    source = conversion(merged_dir, out_dir, run)[1].parent
    if (calibration is None) and (target.options.get("imatrix") or target.options.get("max_size_mb")):
        raise ConfigError(f"--target {target.name}: imatrix and max_size_mb need a calibration set (a build)")
    max_size_mb = target.options.get("max_size_mb")
    if max_size_mb is not None:
        try:  # before any calibration stage spends minutes on a budget no mix can meet
            check_budget(Layout.of(source / GGUF_FILE), tuple(target.options.get("mix", DEFAULT_MIX)), max_size_mb)
        except ConfigError as e:
            raise ConfigError(f"--target {target.name}: {e}") from None
    imatrix_dir = _imatrix(target, merged_dir, source, out_dir, run, threads, calibration)
    sensitivity_dir = None
    if max_size_mb is not None:
        sensitivity_dir = _sensitivity(target, source, imatrix_dir, out_dir, run, threads, calibration, progress)
    out = run(
        f"quantize {target.name}",
        lambda: quantize(
            source, Path(out_dir) / target.name, target.quant, threads, imatrix_dir, sensitivity_dir, max_size_mb
        ),
    )
    return out.path / GGUF_FILE


def _imatrix(target, merged_dir: Path, source: Path, out_dir: Path, run: Run, threads: int, calibration):
    """The importance-matrix stage of the target's calibration set, shared by every target naming it."""
    which = target.options.get("imatrix")
    if not which:
        return None

    calib = calibration(which)
    return run(
        f"imatrix {which}",
        lambda: imatrix_stage(merged_dir, source, Path(out_dir) / f"imatrix-{which}", calib, threads),
    ).path


def sensitivity_stage_name(target) -> str:
    """The sweep's stage name (its folder: spaces as dashes): named by the mix and the importance matrix,
    not the target, since one sweep serves every budget over them."""
    label = "-".join(target.options.get("mix", DEFAULT_MIX)).lower()
    if which := target.options.get("imatrix"):
        label += f"-imat-{which}"
    return f"sensitivity {label}"


def _sensitivity(target, source: Path, imatrix_dir, out_dir: Path, run: Run, threads: int, calibration, progress):
    """The sensitivity sweep a mixed target plans from: on the imatrix's calibration set, else the task's.
    One sweep serves every budget over the same mix and matrix, so it is named by those, not the target."""
    which = target.options.get("imatrix") or "task"
    chunks = calibration(which, "sensitivity")
    return run(
        sensitivity_stage_name(target),
        lambda: sensitivity_stage(
            source,
            Path(out_dir) / sensitivity_stage_name(target).replace(" ", "-"),
            chunks,
            tuple(target.options.get("mix", DEFAULT_MIX)),
            threads,
            imatrix_dir,
            progress,
        ),
    ).path


def resource_estimates(target, shape, ladder_export: bool) -> list:
    """The stages ``target`` adds to a build, each with its estimated peak RAM and disk (see
    :mod:`edgeft.resources`). The exporter and llama.cpp's quantizer work tensor by tensor over
    memory-mapped files; the imatrix is a torch forward pass over one fp32 copy."""
    n, largest = shape.parameters, 4 * shape.largest_tensor
    by_tensor = BASELINE_BYTES + 3 * largest
    export = StageEstimate("export", by_tensor, 4 * n, "tensor by tensor: 3 × the largest fp32 tensor")
    size = int(FILE_BITS_PER_WEIGHT.get(target.quant, 16.0) * n / 8)
    bench = StageEstimate(f"bench {target.name}", BASELINE_BYTES + size, 0, "llama.cpp: the file + KV cache")
    out = [export] if needs_quantize(target.quant) or target.quant == "F32" or ladder_export else []
    if ladder_export:
        out.append(
            StageEstimate(
                f"bench {CONVERSION}", BASELINE_BYTES + 4 * n, 0, "llama.cpp: the F32 file", LADDER_EXPORT_HINT
            )
        )
    if target.quant == "F32":
        return out
    if not needs_quantize(target.quant):
        return [*out, StageEstimate(f"export {target.name}", by_tensor, size, "tensor by tensor"), bench]
    if which := target.options.get("imatrix"):
        out.append(StageEstimate(f"imatrix {which}", BASELINE_BYTES + 4 * n, 0, "one fp32 copy (torch)"))
    if target.options.get("max_size_mb") is not None:
        out.append(
            StageEstimate(
                sensitivity_stage_name(target), BASELINE_BYTES + 2 * size + 4 * n, 0, "F32 export mapped + probe models"
            )
        )
    out.append(StageEstimate(f"quantize {target.name}", by_tensor, size, "llama.cpp, tensor by tensor"))
    return [*out, bench]


def context_length(artifact: Path, read_json: Callable[[Path, str], dict[str, Any]]) -> tuple[Any, Path | None]:
    """None: a GGUF's context is the model's (``max_position_embeddings``), which the caller reads."""
    return None, None
