"""Artifact formats, looked up by name. Each is one package with the same surface, so the pipeline,
the bench and the report dispatch on ``target.format`` and know nothing of any one format.

A format package (``formats/gguf/``: ``types.py`` facts as tables, ``export.py``, ``quantize.py``,
``inspect.py``) exposes in its ``__init__``:

* ``NAME``, ``RUNTIME`` (a name in :data:`edgeft.runtimes.RUNTIMES`: what benches it, and the runtime a
  report row without one was timed by), ``TARGET_KEYS`` (the keys a target file of this format may
  set besides format/quant/description), ``ARTIFACT_HINT`` (what a user's path should be, for
  errors), ``CONVERSION`` (the unquantized export's target name);
* ``ARTIFACT_FILE``: the name a one-file artifact has in its stage folder, a bundle and a device
  upload; None for a folder artifact, whose files keep their names (a one-file artifact's bundle
  also carries the merged model's tokenizer files; a folder carries its own);
* ``KV_CACHE_AT_OPEN``: whether the runtime allocates its KV cache for the whole context it is
  opened with (then the bench's peak RSS was measured at ``config.BENCH_CONTEXT``), rather than per
  request (at the bench's prompt + decode tokens); ``OLLAMA_MODELFILE``: whether a bundle gets an
  Ollama ``Modelfile``;
* ``context_length(artifact, read_json)`` → ``(context, file)``: the context an artifact was built
  for and the file saying so, or ``(None, None)`` when it is the model's;
* ``check_target(name, quant, options, where)`` — raise ConfigError for a target this edgeft cannot
  produce (called when target files are read, so a bad one fails before any work);
* ``build(target, merged_dir, out_dir, run, threads, calibration, progress)`` → the artifact path,
  through cached stages (``run(stage_name, fn)`` runs and logs one stage; ``calibration(source,
  purpose)`` gives the build's calibration set; ``progress(description, total)`` → ``advance()``);
* ``conversion(merged_dir, out_dir, run)`` → ``(label, artifact)``: the unquantized export, whose
  fidelity row separates conversion loss from quantization loss;
* ``export_artifact(target, model, out_dir)`` and ``quantize_artifact(target, source_dir, out_dir,
  threads)`` → ``(stage output, artifact)``: ``edgeft export`` (straight from a built-in model name
  or a Hugging Face folder) and ``edgeft quantize`` (from an export), each raising ConfigError
  naming the command to use for a target it cannot make alone;
* ``find_artifact(path)`` → the artifact a user's path names, or None if it is not this format's;
  ``check_artifact(path)`` — a cheap validity check; ``describe(path)`` → size, tensor types, file
  type; ``bytes_per_token(path)`` → weight bytes read per decoded token (the roofline's input);
  ``kv_bytes_per_token(path)`` → KV-cache bytes per context token in the runtime's cache (or None).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from ..errors import ConfigError, ModelError

# format name → its package
FORMATS: dict[str, str] = {
    "gguf": "edgeft.formats.gguf",
    "onnx": "edgeft.formats.onnx",
}


def get_format(name: str) -> ModuleType:
    if name not in FORMATS:
        raise ConfigError(f"format {name!r}: expected one of {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[name])


def default_runtime(format_name: str | None) -> str:
    """The runtime a report row without one was timed by: its format's (rows written before formats
    were recorded are GGUF); a name outside the registry is shown as it is."""
    name = format_name or "gguf"
    return get_format(name).RUNTIME if name in FORMATS else str(name)


def shipped_name(path: Path) -> str | None:
    """The name a one-file artifact at ``path`` travels under (None: not a one-file artifact)."""
    for name in FORMATS:
        fmt = get_format(name)
        if fmt.ARTIFACT_FILE is not None and fmt.find_artifact(path) == Path(path):
            return fmt.ARTIFACT_FILE
    return None


def detect_artifact(path: Path, option: str = "--artifact") -> tuple[ModuleType, Path]:
    """(format, artifact) for a user's path: a file, or a stage folder holding one; checked cheaply."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{option} {path}: no such file or folder")
    for name in FORMATS:
        fmt = get_format(name)
        artifact = fmt.find_artifact(path)
        if artifact is not None:
            fmt.check_artifact(artifact)
            return fmt, artifact
    kinds = "; or ".join(get_format(name).ARTIFACT_HINT for name in FORMATS)
    raise ModelError(f"{option} {path}: not an artifact edgeft can bench (expected {kinds})")
