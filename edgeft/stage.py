"""A stage writes one output directory atomically, with a manifest that names its inputs.

Every stage (materialise, train, merge, export, quantize, bench) follows the same protocol:

1. compute a *key*: a hash of the stage name, the edgeft version, the content hashes of its inputs
   and its parameters;
2. if the final directory already holds a manifest with that key, reuse it (a cache hit);
3. otherwise write into a fresh temporary sibling directory, add ``manifest.json`` (stage, version,
   key, inputs, parameters, sha256 of every output file) and rename it into place.

A killed run therefore never leaves a half-written artifact at a final path, and a finished
directory carries the hashes that downstream stages use as their input hashes (no re-hashing of
large files).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def content_hash(path: Path) -> str:
    """Hash of a file or directory's content.

    A directory written by a stage is hashed through its manifest's file hashes (cheap); any other
    directory is hashed file by file.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    manifest = read_manifest(path)
    files = manifest["outputs"] if manifest else _file_hashes(path)
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def stage_key(stage: str, inputs: dict[str, str], params: dict[str, Any]) -> str:
    """The cache key: same stage, inputs and parameters give the same key."""
    blob = json.dumps(
        {"stage": stage, "version": __version__, "inputs": inputs, "params": params},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class StageOutput:
    """What a stage left at its final path."""

    path: Path
    cached: bool
    manifest: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def cached(final: Path, key: str) -> StageOutput | None:
    manifest = read_manifest(final)
    if manifest and manifest.get("key") == key:
        return StageOutput(Path(final), True, manifest, 0.0)
    return None


@contextlib.contextmanager
def staged_dir(
    final: Path, stage: str, key: str, inputs: dict[str, str], params: dict[str, Any]
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(tmp_dir, extra)``; on success write the manifest and rename tmp_dir to ``final``.

    ``extra`` is a dict the stage may fill with results worth recording (metrics, wall times); it is
    stored under ``"results"`` in the manifest. On any exception the temporary directory is removed
    and ``final`` is left exactly as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        yield tmp, extra
        manifest = {
            "stage": stage,
            "edgeft_version": __version__,
            "key": key,
            "inputs": inputs,
            "params": params,
            "results": extra,
            "seconds": round(time.perf_counter() - start, 3),
            "outputs": _file_hashes(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_stage(
    final: Path,
    stage: str,
    inputs: dict[str, Any],
    params: dict[str, Any],
    work: Callable[[Path], dict[str, Any] | None],
) -> StageOutput:
    """The whole protocol: reuse ``final`` when its key matches, else ``work(tmp_dir)`` and rename.

    ``work`` writes its payload into the temporary directory it is given and may return results
    worth recording in the manifest.
    """
    key = stage_key(stage, inputs, params)
    if hit := cached(final, key):
        return hit
    with staged_dir(final, stage, key, inputs, params) as (tmp, results):
        results.update(work(tmp) or {})
    return StageOutput(Path(final), False, read_manifest(final) or {})


def _replace_dir(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst``; an older ``dst`` is moved aside first and removed only afterwards."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cache_root() -> Path:
    """Where edgeft keeps materialised models: ``$EDGEFT_CACHE`` or the user's cache dir."""
    env = os.environ.get("EDGEFT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgeft"
