"""ONNX for onnxruntime / onnxruntime-genai apps: exported and quantized in one builder pass.

A target with a size budget (``max_size_mb`` / ``max_size_ratio``) takes three stages instead: the
all-int4 export, a sensitivity sweep on the fp32 export, and the builder run that writes the plan
(see :mod:`.mixed`). The format surface is described in :mod:`edgeft.formats`; the artifact is a
folder (see :mod:`.inspect`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ...calibration import SOURCES
from ...errors import ConfigError
from ...models import resolve_model
from ...resources import BASELINE_BYTES, LADDER_EXPORT_HINT, StageEstimate
from . import mixed
from .export import RELEASE_EVERY_BYTES, export
from .inspect import check_artifact, describe, find_artifact, genai_config
from .rounding import importance_stage
from .types import KNOBS, PRECISIONS

NAME = "onnx"
RUNTIME = "onnxruntime-genai"
# max_size_mb | max_size_ratio (× the all-int4 folder): int4 with the MatMuls whose rounding costs
# most kept at int8, chosen from a measured sensitivity sweep to fit that size (see .mixed)
PLAN_KEYS: tuple[str, ...] = ("max_size_mb", "max_size_ratio")
# imatrix = "task" | "general" | "mix": int4 blocks rounded to least importance-weighted error, the
# importance measured on that calibration set (see .rounding); the builder's rounding otherwise
EDGEFT_KEYS: tuple[str, ...] = ("imatrix", *PLAN_KEYS)  # handled by edgeft, never passed to the builder
TARGET_KEYS: tuple[str, ...] = (*KNOBS, *EDGEFT_KEYS)
ARTIFACT_HINT = "an onnxruntime-genai folder (genai_config.json, model.onnx)"
CONVERSION = "onnx-fp32"
# A folder (genai_config.json, model.onnx, its data, tokenizer files): its files keep their names.
ARTIFACT_FILE = None
# onnxruntime-genai allocates its KV cache per request: memory was measured at the bench's prompt +
# decode tokens, not at a fixed context.
KV_CACHE_AT_OPEN = False
OLLAMA_MODELFILE = False  # Ollama does not load ONNX

__all__ = ["check_artifact", "describe", "find_artifact"]

Run = Callable[[str, Callable[[], Any]], Any]


def check_target(name: str, quant: str, options: dict[str, Any], where: str) -> None:
    if quant not in PRECISIONS:
        raise ConfigError(f"{where}: quant: expected one of {', '.join(PRECISIONS)}, got {quant!r}")
    planning = [k for k in PLAN_KEYS if k in options]
    if planning:
        _check_plan_keys(quant, options, planning, where)
    if "imatrix" in options:
        _check_imatrix(quant, options, where)
    for key, value in options.items():
        if key in EDGEFT_KEYS:
            continue
        allowed = KNOBS[key][0]
        if isinstance(value, bool) != isinstance(allowed[0], bool) or value not in allowed:
            raise ConfigError(f"{where}: {key}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
    if quant == "fp32" and options:
        raise ConfigError(f"{where}: {sorted(options)[0]}: fp32 targets take no quantization options")
    if options.get("shared_embeddings") and quant != "int4":
        raise ConfigError(f"{where}: shared_embeddings: only int4 can quantize the embedding with the head")


def _check_plan_keys(quant: str, options: dict[str, Any], planning: list[str], where: str) -> None:
    if len(planning) > 1:
        raise ConfigError(f"{where}: max_size_mb and max_size_ratio: give one size budget, not both")
    key = planning[0]
    size = options[key]
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 < size < float("inf"):
        raise ConfigError(f"{where}: {key}: expected a positive number, got {size!r}")
    if key == "max_size_ratio" and size < 1:
        raise ConfigError(f"{where}: max_size_ratio: expected at least 1 (× the all-int4 folder), got {size!r}")
    if quant != "int4":
        raise ConfigError(f'{where}: {key}: a size budget mixes int4 and int8 MatMuls; set quant = "int4"')
    # the sweep measures the builder's default rounding at 32-value blocks with the head quantized
    fixed = {"algo_config": "default", "block_size": 32, "exclude_lm_head_quant": False}
    for knob, value in fixed.items():
        if knob in options and options[knob] != value:
            raise ConfigError(f"{where}: {knob}: a size-budgeted target uses {value!r}, got {options[knob]!r}")


def _check_imatrix(quant: str, options: dict[str, Any], where: str) -> None:
    if options["imatrix"] not in SOURCES:
        raise ConfigError(f"{where}: imatrix: expected one of {', '.join(SOURCES)}, got {options['imatrix']!r}")
    if quant != "int4":
        raise ConfigError(f'{where}: imatrix: weighs int4 rounding only (int8 loses little); set quant = "int4"')
    if options.get("algo_config", "default") != "default":
        # rtn/k_quant write zero points; the re-rounding writes the default quantizer's symmetric blocks
        raise ConfigError(
            f"{where}: algo_config: imatrix re-rounds the 'default' quantizer's blocks, got {options['algo_config']!r}"
        )


def bytes_per_token(folder: Path) -> int:
    return describe(folder)["bytes_per_token"]


def kv_bytes_per_token(folder: Path) -> int | None:
    """KV-cache bytes per context token: the builder's CPU graphs keep past keys/values in fp32."""
    d = genai_config(folder)["model"]["decoder"]
    try:
        return int(d["num_hidden_layers"]) * int(d["num_key_value_heads"]) * int(d["head_size"]) * 2 * 4
    except (KeyError, TypeError, ValueError):
        return None


def export_artifact(target, model: str, out_dir: Path) -> tuple[Any, Path]:
    """``edgeft export``: (stage output, artifact) of ``target`` written straight from a model (a
    built-in name or a Hugging Face folder of a family edgeft knows) into ``out_dir``: export and
    quantization are one builder run. A target with an importance matrix or a size budget needs a
    calibration set: a build."""
    planned = [k for k in EDGEFT_KEYS if k in target.options]
    if planned:
        raise ConfigError(f"--target {target.name}: {', '.join(planned)} need a calibration set; use `edgeft build`")
    knobs = {k: v for k, v in target.options.items() if k not in EDGEFT_KEYS}
    out = export(resolve_model(model), out_dir, target.quant, knobs)
    return out, out.path


def quantize_artifact(target, source_dir: Path, out_dir: Path, threads: int) -> tuple[Any, Path]:
    """ONNX is quantized as the builder exports it: there is no separate quantize step."""
    raise ConfigError(
        f"--target {target.name}: ONNX targets are quantized as they are exported; use `edgeft export --target {target.name}`"
    )


def conversion(merged_dir: Path, out_dir: Path, run: Run) -> tuple[str, Path]:
    out = run(f"export {CONVERSION}", lambda: export(merged_dir, Path(out_dir) / CONVERSION, "fp32", {}))
    return CONVERSION, out.path


def build(target, merged_dir: Path, out_dir: Path, run: Run, threads: int, calibration=None, progress=None) -> Path:
    """``target``'s onnxruntime-genai folder: export and quantization are one builder run. A target
    with a size budget first measures every MatMul's sensitivity on the task's calibration set and
    has the builder keep the plan's MatMuls at int8 (see :mod:`.mixed`)."""
    if target.quant == "fp32" and not target.options:
        return conversion(merged_dir, out_dir, run)[1]
    knobs = {k: v for k, v in target.options.items() if k not in EDGEFT_KEYS}
    if calibration is None and any(k in target.options for k in EDGEFT_KEYS):
        raise ConfigError(f"--target {target.name}: imatrix and a size budget need a calibration set (a build)")
    rounding = _importance(target, merged_dir, Path(out_dir), run, threads, calibration)
    if not any(k in target.options for k in PLAN_KEYS):
        out = run(
            f"export {target.name}",
            lambda: export(merged_dir, Path(out_dir) / target.name, target.quant, knobs, rounding=rounding),
        )
        return out.path
    return _mixed(target, knobs, merged_dir, Path(out_dir), run, threads, calibration, progress, rounding)


def _importance(target, merged_dir: Path, out_dir: Path, run: Run, threads: int, calibration):
    """(fp32 export, importance stage) for a target with ``imatrix``, shared by every target naming
    the same calibration set; None for the builder's rounding."""
    which = target.options.get("imatrix")
    if not which:
        return None

    fp32 = conversion(merged_dir, out_dir, run)[1]
    calib = calibration(which)
    stage = run(
        f"imatrix onnx {which}", lambda: importance_stage(fp32, out_dir / f"imatrix-onnx-{which}", calib, threads)
    )
    return fp32, stage.path


def _mixed(
    target, knobs: dict[str, Any], merged_dir: Path, out_dir: Path, run: Run, threads, calibration, progress, rounding
):
    fp32 = conversion(merged_dir, out_dir, run)[1]
    # the all-int4 folder this plan starts from: onnx-int4 itself when the knobs are the defaults
    base = "onnx-int4" if not knobs else f"{target.name}-all-int4"
    int4 = run(f"export {base}", lambda: export(merged_dir, out_dir / base, "int4", knobs)).path
    try:  # before the sweep spends minutes on a budget no plan can meet
        mixed.check_budget(target.options, fp32, int4)
    except ConfigError as e:
        raise ConfigError(f"--target {target.name}: {e}") from None
    # measured on the importance's calibration set, with the int4 rounding the folder will get
    which = target.options.get("imatrix") or "task"
    chunks = calibration(which, "sensitivity")
    label = "onnx-int4-int8" + (f"-imat-{which}" if rounding else "")
    sensitivity = run(
        f"sensitivity {label}",
        lambda: mixed.sensitivity_stage(
            fp32, int4, out_dir / f"sensitivity-{label}", chunks, threads, progress, rounding and rounding[1]
        ),
    ).path
    chosen = mixed.read_plan(sensitivity, target.options, f"--target {target.name}")
    promoted = mixed.overrides(chosen["levels"])
    record = {
        "plan": {k: v for k, v in chosen.items() if k != "levels"},
        "int8_nodes": [o["match"]["name"] for o in promoted],
    }
    out = run(
        f"export {target.name}",
        lambda: export(
            merged_dir, out_dir / target.name, "int4", knobs, overrides=promoted, record=record, rounding=rounding
        ),
    )
    mixed.check_written(out.path, chosen)
    return out.path


# bytes per parameter of a MatMulNBits folder: 4 or 8 bits plus an fp32 scale per block of 32
_BYTES_PER_PARAM = {"fp32": 4.0, "int8": 1.125, "int4": 0.625}


def _builder_peak(quant: str, shape) -> tuple[int, str]:
    """Peak RSS of the onnxruntime-genai builder's process with edgeft's glue (see :mod:`.export`):
    the largest tensor twice (the builder's transposed copy beside its mapped pages) or, quantized,
    the quantized weights held until the save beside the largest fp32 weight being quantized and its
    quantized copies; plus the mapped bytes read between two releases. Measured on Qwen2.5-Coder-0.5B
    (2.52 GB, largest tensor 0.54 GB): fp32 1.74 GB, int8 2.01 GB, int4 1.72 GB (the builder alone:
    3.65, 7.18, 6.72 GB); this gives 2.12, 2.59, 2.14 GB (BASELINE_BYTES is 0.9 GB, the process's own
    was 0.4 GB)."""
    largest = 4 * shape.largest_tensor
    held, basis = 2 * largest, "onnxruntime-genai builder: the largest tensor twice"
    if quant != "fp32":
        per_param = _BYTES_PER_PARAM[quant]
        held = max(held, largest + int(per_param * shape.parameters) + int(2 * largest * per_param / 4))
        # the quantizer reads the weights from a temporary fp32 copy on disk (deleted after the export)
        basis += f", or the largest beside the {quant} weights"
    return BASELINE_BYTES + held + RELEASE_EVERY_BYTES, basis


def resource_estimates(target, shape, ladder_export: bool) -> list:
    """The stages ``target`` adds to a build, each with its estimated peak RAM and disk (see
    :mod:`edgeft.resources`)."""
    n = shape.parameters
    size = int(_BYTES_PER_PARAM.get(target.quant, 4.0) * n)
    out = []
    needs_fp32 = ladder_export or target.quant == "fp32" or any(k in target.options for k in EDGEFT_KEYS)
    if needs_fp32:
        peak, basis = _builder_peak("fp32", shape)
        out.append(StageEstimate(f"export {CONVERSION}", peak, 4 * n, basis))
    if ladder_export:
        out.append(
            StageEstimate(
                f"bench {CONVERSION}", BASELINE_BYTES + 4 * n, 0, "onnxruntime: the fp32 graph", LADDER_EXPORT_HINT
            )
        )
    if which := target.options.get("imatrix"):
        inlined = BASELINE_BYTES + 8 * n
        out.append(StageEstimate(f"imatrix onnx {which}", inlined, 0, "fp32 graph inlined + its session"))
    if any(k in target.options for k in PLAN_KEYS):
        # measured on SmolLM2-135M (0.54 GB of fp32 weights): peak RSS 1.71 GB, 0.57 GB of it the mapped file
        basis = "int8-rounded weights, the fp32 file mapped, the session's buffers"
        out.append(StageEstimate("sensitivity onnx", BASELINE_BYTES + 6 * n, 0, basis))
    if target.quant != "fp32" or target.options:
        peak, basis = _builder_peak(target.quant, shape)
        out.append(StageEstimate(f"export {target.name}", peak, size, basis))
    out.append(StageEstimate(f"bench {target.name}", BASELINE_BYTES + size, 0, "onnxruntime-genai: the folder"))
    return out


def context_length(artifact: Path, read_json: Callable[[Path, str], dict[str, Any]]) -> tuple[Any, Path | None]:
    """(the context the folder was built for, the file saying so): genai_config's, unchecked (the
    caller checks it); ``read_json(path, what)`` is the caller's reader for files of a build."""
    path = Path(artifact) / "genai_config.json"
    genai = read_json(path, "genai_config")
    return (genai["model"].get("context_length") if isinstance(genai.get("model"), dict) else None), path
