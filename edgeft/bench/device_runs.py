"""Measurements made on other machines, kept with the build they measured.

Two ways in: ``edgeft bench --remote HOST`` (edgeft itself ran on the device over SSH) and
``edgeft bench --llama-bench FILE`` (llama.cpp's own benchmark, run by the user on the device).
Each becomes one *device run*: a JSON record under ``BUILD/devices/`` with the device's machine
description and one row per artifact. A build's report lists every stored run in its own section,
beside (never inside) this machine's table, so a rebuild keeps them and a device's figures are never
mistaken for this machine's.

Record: ``{source, imported_at, measured_at, machine: {cpu_model, …, runtime_builds}, rows: [{target,
size_bytes, threads, runtime, prefill: {tokens, tok_s: {median, min, max | mean, stddev}} | None,
decode: …, peak_rss_bytes, kl_divergence_mean, task_accuracy}], …}``; rows whose artifact is not one
of the build's targets keep ``target: None`` and their own model name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..build_layout import built_targets
from ..errors import ConfigError, OutputError
from ..files import sha256_file, write_atomic
from ..formats import default_runtime, detect_artifact
from ..formats.gguf.inspect import read_gguf
from ..stage import read_manifest
from ..untrusted import ANY, NUM, STR, Oversized, ShapeError, check_shape, cleaned, list_of, map_of, optional
from . import llama_bench

DIR = "devices"
_MAX_SLUG = 100  # file names stay far below the 255 bytes file systems allow
_MAX_RECORD_BYTES = 16 << 20  # a record is a few KB; it is parsed whole
_MAX_DEPTH = 32


def slug(text: str) -> str:
    """A file-name-safe key for a run (``remote-pi-raspberrypi.local``, ``llama-bench-3f2a…``): only
    letters, digits, '.', '_' and '-', never '.', '..' or a leading dot, so it names a file inside the
    devices folder and nothing else; a long key is cut and keeps a hash of the whole."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "device"
    if len(name) > _MAX_SLUG:
        name = f"{name[: _MAX_SLUG - 13]}-{hashlib.sha256(text.encode(errors='replace')).hexdigest()[:12]}"
    return name


def _folder(build_dir: Path) -> Path:
    """``BUILD/devices``; a link there (records would be read from or written to its target) is refused."""
    folder = Path(build_dir) / DIR
    if folder.is_symlink():
        raise OutputError(f"{folder}: is a symbolic link; device runs are kept in a real folder of the build")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is not a folder; move it away to store device runs in the build")
    return folder


def save(build_dir: Path, key: str, record: dict[str, Any]) -> Path:
    """Store (or replace) the run ``key`` of ``build_dir``; written whole or not at all."""
    folder = _folder(build_dir)
    folder.mkdir(exist_ok=True)
    path = folder / f"{slug(key)}.json"
    write_atomic(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path


def _tok_s(value: Any, path: str) -> None:
    """A speed as median [min–max] (samples known) or mean ± sd, as _speed_cell in report.py shows it."""
    if value is None:
        return
    keys = ("median", "min", "max") if isinstance(value, dict) and "median" in value else ("mean",)
    ok = isinstance(value, dict) and all(_number(value.get(k)) for k in keys)
    if not ok or (value.get("stddev") is not None and not _number(value["stddev"])):
        raise ShapeError(f"{path}: expected numbers median, min and max, or mean (and stddev)")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_TEST = optional({"tokens": optional(ANY), "tok_s": _tok_s})
# What the report reads of a stored run (report.py, _device_runs_section): checked when a run is read,
# since a build folder may come from elsewhere.
_RECORD = {
    "source": STR,
    "file": optional(STR),
    "machine": optional(
        {
            "cpu_model": optional(STR),
            "cores": optional(ANY),
            "ram_bytes": optional(NUM),
            "runtime_builds": optional(map_of(STR)),
        }
    ),
    "rows": list_of(
        {
            "target": optional(STR),
            "prefill": _TEST,
            "decode": _TEST,
            "peak_rss_bytes": optional(NUM),
            "kl_divergence_mean": optional(NUM),
            "task_accuracy": optional(NUM),
        }
    ),
}


def _read(path: Path) -> dict[str, Any]:
    """One stored run, checked, every string made safe to print (see :mod:`edgeft.untrusted`)."""
    again = "delete it or import it again"
    try:
        # O_NOFOLLOW: a link planted at a record's name is refused, never read through
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if path.is_symlink():
            raise ConfigError(f"{path}: is a symbolic link, not a device run; {again}") from None
        raise ConfigError(f"{path}: unreadable device run ({e.strerror or e}); {again}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file; {again}")
        if info.st_size > _MAX_RECORD_BYTES:
            raise ConfigError(f"{path}: {info.st_size} bytes, not a device run (a few KB); {again}")
        raw = fh.read(_MAX_RECORD_BYTES + 1)
    try:
        record = cleaned(json.loads(raw), _MAX_DEPTH)
    except RecursionError:
        raise ConfigError(f"{path}: unreadable device run (nested too deeply); {again}") from None
    except Oversized as e:
        raise ConfigError(f"{path}: unreadable device run ({e}); {again}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path}: unreadable device run ({e}); {again}") from None
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
        raise ConfigError(f"{path}: not an edgeft device run (no 'rows' list); {again}")
    try:
        check_shape(record, _RECORD)
    except ShapeError as e:
        raise ConfigError(f"{path}: not an edgeft device run ({e}); {again}") from None
    return record


def load_all(build_dir: Path) -> list[dict[str, Any]]:
    """Every stored run of ``build_dir``, oldest import first; an unreadable record is an error naming it."""
    folder = _folder(build_dir)
    if not folder.is_dir():
        return []
    runs = []
    for path in sorted(folder.glob("*.json")):
        record = _read(path)
        record["key"] = path.stem
        runs.append(record)
    return sorted(runs, key=lambda r: str(r.get("imported_at") or ""))


def from_report(report: dict[str, Any], source: str, imported_at: str, **extra: Any) -> dict[str, Any]:
    """A device run from a full edgeft report measured on the device (``--remote``): speed, memory
    and fidelity per target, the device's own machine description."""
    rows = []
    for t in report["targets"]:
        lat = t["latency"]["artifact"]
        rows.append(
            {
                "target": t["target"],
                "model": t["artifact"]["path"],
                "model_type": t["artifact"].get("quant"),
                "size_bytes": t["artifact"]["size_bytes"],
                "threads": t["latency"]["threads"],
                "runtime": f"{t['artifact'].get('runtime') or default_runtime(t['artifact'].get('format'))} {lat.get('runtime_version', '')}".strip(),
                "prefill": {"tokens": lat.get("prompt_tokens"), "tok_s": lat["prefill_tok_s"]},
                "decode": {"tokens": lat.get("decode_tokens"), "tok_s": lat["decode_tok_s"]},
                "other_tests": [],
                "peak_rss_bytes": t["memory"]["peak_rss_bytes"],
                "kl_divergence_mean": t["fidelity"]["kl_divergence_mean"],
                "task_accuracy": t["fidelity"].get("task_accuracy_artifact"),
            }
        )
    return {
        "source": source,
        "imported_at": imported_at,
        "measured_at": max(
            (str((t["latency"].get("timed") or {}).get("timed_at") or "") for t in report["targets"]), default=""
        )
        or imported_at,
        "machine": report.get("machine") or {},
        "passed": report.get("passed"),
        "rows": rows,
        **extra,
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_targets(build_dir: Path) -> dict[str, Path]:
    """The build's quantized/exported targets: name → artifact path (the shapes `edgeft bench --build` reads)."""
    build_dir = Path(build_dir)
    if not build_dir.is_dir() or (read_manifest(build_dir) or {}).get("stage") != "build":
        raise ConfigError(f"--build {build_dir}: not an `edgeft build --out` folder (no build manifest.json)")
    return {name: detect_artifact(build_dir / name, f"--build {build_dir}:")[1] for name in built_targets(build_dir)}


def import_llama_bench(build_dir: Path, path: Path) -> tuple[dict[str, Any], Path]:
    """Store a llama-bench JSON file as a device run of ``build_dir`` (the caller refolds its report)."""
    build_dir, path = Path(build_dir), Path(path)
    llama_bench.read_records(path)  # refuse a bad file before reading any GGUF
    sizes = {
        name: sum(int(t.n_bytes) for t in read_gguf(artifact).tensors)
        for name, artifact in build_targets(build_dir).items()
        if artifact.suffix == ".gguf"
    }
    record = llama_bench.device_run(path, sizes, now())
    digest = sha256_file(path)[:12]
    stored = save(build_dir, f"llama-bench-{digest}", record)
    return record, stored
