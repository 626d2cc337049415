"""A stage writes one output directory atomically, with a manifest that names its inputs.

Every stage (materialise, train, merge, export, quantize, bench) follows the same protocol:

1. compute a *key*: a hash of the stage name, the edgeft version, the content hashes of its inputs
   and its parameters;
2. if the final directory already holds a manifest with that key, reuse it (a cache hit);
3. otherwise write into a fresh temporary sibling directory, add ``manifest.json`` (stage, version,
   key, inputs, parameters, sha256 of every output file) and rename it into place.

A killed run therefore never leaves a half-written artifact at a final path, and a finished
directory carries the hashes that downstream stages use as their input hashes (no re-hashing of
large files). The temporary directory is named after the process that writes it
(``.NAME.tmp-PID-RANDOM``), so the next run removes those whose writer is gone (a killed run's)
and leaves a concurrent run's alone.

edgeft replaces only what it wrote: :func:`check_output_dir` refuses an output path that is a file,
or a non-empty folder without an edgeft manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__
from .errors import OutputError
from .files import write_atomic

MANIFEST = "manifest.json"
# .NAME.tmp-PID-HEX (a stage being written) and .NAME.old-PID-HEX (a replaced one being removed);
# the PID group is absent in folders left by edgeft 0.1.
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}$")
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
    files = manifest["outputs"] if manifest and "outputs" in manifest else _file_hashes(path)
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a folder, or None when it has none that reads as a JSON object (hostile
    JSON included: nested past the recursion limit, larger than edgeft reads)."""
    from .loading import read_json

    try:
        manifest = read_json(Path(path) / MANIFEST)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


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
    check_output_dir(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(final.parent, final.name)
    tmp = final.parent / _scratch_name(final.name, "tmp")
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
        old = dst.parent / _scratch_name(dst.name, "old")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _scratch_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_scratch(folder: Path, name: str | None = None) -> list[Path]:
    """Remove temporary stage folders in ``folder`` left by runs that were killed.

    Only folders whose writer process is gone are removed, so a concurrent build into the same
    folder keeps its work. ``name`` limits the sweep to one stage's scratch folders.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for p in entries:
        m = _SCRATCH.match(p.name)
        if not m or (name is not None and m["name"] != name) or not p.is_dir() or p.is_symlink():
            continue
        if m["pid"] is None or not _alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def is_edgeft_output(path: Path) -> bool:
    """Whether ``path`` is a folder edgeft wrote: a stage folder, or a build/bench folder of them."""
    path = Path(path)
    if (read_manifest(path) or {}).get("stage"):
        return True
    # build/bench folders written before they carried a manifest of their own
    return (path / "report.json").is_file() or any(
        (read_manifest(p) or {}).get("stage") for p in path.iterdir() if p.is_dir()
    )


def check_output_dir(path: Path, option: str = "--out") -> None:
    """Refuse an output path edgeft would have to destroy something of the user's to write.

    Allowed: a path that does not exist, an empty folder, or a folder edgeft wrote earlier (it is
    replaced, or reused when cached). Refused: a file, a symlink, any other non-empty folder.
    """
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{option} {path}: is a symbolic link; give a real folder path")
    if not path.exists():
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise OutputError(f"{option} {path}: {parent} is a file, not a folder")
                break
        return
    if not path.is_dir():
        raise OutputError(f"{option} {path}: is an existing file; edgeft writes a folder there and will not replace it")
    if any(path.iterdir()) and not is_edgeft_output(path):
        raise OutputError(
            f"{option} {path}: folder exists and was not written by edgeft (no {MANIFEST}); "
            "choose a new --out or empty it first"
        )


@contextlib.contextmanager
def output_dir(path: Path, stage: str, params: dict[str, Any]) -> Iterator[Path]:
    """Make ``path`` an edgeft folder (a build's or a bench's) for the duration of a command.

    The folder gets a manifest naming the command, so later runs may write into it, and stale
    scratch folders of killed runs are removed. When the command fails before any stage finished in
    a folder this call created, the folder is removed again: a refused input leaves nothing behind,
    while finished stages of a longer run stay (they are its cache).
    """
    path = Path(path)
    check_output_dir(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"stage": stage, "edgeft_version": __version__, "params": params}
    write_atomic(path / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    remove_stale_scratch(path)
    try:
        yield path
    except BaseException:
        if created and all(p.name == MANIFEST or _SCRATCH.match(p.name) for p in path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)
        raise


def cache_root() -> Path:
    """Where edgeft keeps materialised models: ``$EDGEFT_CACHE`` or the user's cache dir."""
    env = os.environ.get("EDGEFT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgeft"
