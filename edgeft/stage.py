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
or a non-empty folder without an edgeft manifest (one carrying ``stage`` and ``edgeft_version``,
which every manifest edgeft has written carries), and a stage folder is replaced only while it holds
nothing but the files its manifest lists (:func:`check_replaceable`): a user's file put beside them
is never deleted with them.
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
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from . import __version__
from .errors import OutputError
from .files import sha256_file, write_atomic
from .loading import read_json

MANIFEST = "manifest.json"
# .NAME.tmp-PID-HEX (a stage being written) and .NAME.old-PID-HEX (a replaced one being removed).
# Only names with the writer's pid are edgeft's to sweep: the pid-less ones of the first releases are
# left alone, since ".notes.old-20240101" could as well be a user's backup (it matches that shape).
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
# files.write_atomic's temporary file (mkstemp: ".NAME." + 8 random characters + ".tmp") left by a
# run killed while writing a report or manifest.
_ATOMIC_TMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


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
    files = _outputs(manifest) or _file_hashes(path)  # no or malformed outputs: hashed file by file
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a folder, or None when it has none that reads as a JSON object (hostile
    JSON included: nested past the recursion limit, larger than edgeft reads)."""
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
    check_replaceable(final)  # before the work: refusing after hours of training would waste them
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
    """Put ``src`` at ``dst``; an older ``dst`` is moved aside first and removed only afterwards.

    An older ``dst`` is checked again right before: a file the user put there while the stage ran
    stops the replacement (the new result is dropped, the user's file and the old result stay)."""
    old = None
    check_replaceable(dst)
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
        if not _alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def is_edgeft_manifest(manifest: Any) -> bool:
    """Whether a manifest is one edgeft wrote: a stage name and the edgeft version that wrote it.

    Every manifest edgeft has written carries both (stage folders since the first release, build and
    bench folders since they got a manifest of their own); a user's own ``manifest.json`` rarely does.
    """
    return (
        isinstance(manifest, dict)
        and isinstance(manifest.get("stage"), str)
        and bool(manifest["stage"])
        and isinstance(manifest.get("edgeft_version"), str)
    )


def is_edgeft_output(path: Path) -> bool:
    """Whether ``path`` is a folder edgeft wrote: its own manifest says so.

    A ``report.json``, or a sub-folder with a stage manifest, is not enough: a user's folder may hold
    either (a report copied for a paper, a stage folder copied out of a build) beside their own files.
    """
    return is_edgeft_manifest(read_manifest(path))


def _outputs(manifest: dict[str, Any] | None) -> dict[str, str]:
    """A stage manifest's ``outputs`` (file → sha256); {} when absent or not of that shape."""
    outputs = (manifest or {}).get("outputs")
    if not isinstance(outputs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in outputs.items()):
        return {}
    return outputs


def foreign_entry(path: Path) -> str | None:
    """The first entry of folder ``path`` that its manifest's ``outputs`` does not list, else None.

    Allowed besides the listed files: the manifest itself, the folders that hold listed files, and
    the scratch names edgeft leaves at the top of a folder when killed. A link is never edgeft's.
    A build or bench folder's manifest lists no outputs, so anything in it is foreign here: such a
    folder is never replaced as a whole.
    """
    path = Path(path)
    listed = _outputs(read_manifest(path))
    folders = {parent.as_posix() for name in listed for parent in PurePosixPath(name).parents}
    for root, dirs, files in os.walk(path):
        rel_root = Path(root).relative_to(path)
        dirs.sort()
        for name in sorted(files) + dirs:
            rel = (rel_root / name).as_posix()
            entry = Path(root) / name
            if entry.is_symlink():
                return rel
            if rel_root == Path(".") and (name == MANIFEST or _SCRATCH.match(name) or _ATOMIC_TMP.match(name)):
                continue
            if name in dirs:
                if rel not in folders:
                    return rel
            elif rel not in listed:
                return rel
        # do not descend into scratch folders (their content is the scratch's)
        dirs[:] = [d for d in dirs if not (rel_root == Path(".") and _SCRATCH.match(d))]
    return None


def check_replaceable(path: Path, option: str = "--out") -> None:
    """Refuse to replace folder ``path`` wholesale while it holds anything edgeft did not write there.

    A folder that does not exist or is empty is fine. An existing stage folder may hold only what its
    manifest's ``outputs`` lists (see :func:`foreign_entry`)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink() or not any(path.iterdir()):
        return
    manifest = read_manifest(path)
    if is_edgeft_manifest(manifest) and "outputs" not in manifest:
        raise OutputError(
            f"{option} {path}: is the folder of an edgeft {manifest['stage']}, which holds the output of many stages; "
            "edgeft does not replace it with one stage's output: choose another --out"
        )
    foreign = foreign_entry(path)
    if foreign is not None:
        what = "a link" if (path / foreign).is_symlink() else "not one of the files edgeft wrote there"
        raise OutputError(
            f"{option} {path}: holds {foreign}, {what} (its {MANIFEST} does not list it); edgeft replaces "
            "this folder as a whole and will not delete it: move it elsewhere or choose another --out"
        )


def check_output_dir(path: Path, option: str = "--out") -> None:
    """Refuse an output path edgeft would have to destroy something of the user's to write.

    Allowed: a path that does not exist, an empty folder, or a folder edgeft wrote earlier, which
    its own manifest says (it is replaced, see :func:`check_replaceable`, written into, or reused
    when cached). Refused: a file, a symlink, any other non-empty folder.
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
            f"{option} {path}: folder exists and was not written by edgeft (no {MANIFEST} of edgeft's); "
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
    if _outputs(read_manifest(path)):
        # A stage folder: the manifest written below would replace its own, and the stage would
        # then be taken for a foreign folder (or re-run over the build's files).
        raise OutputError(
            f"--out {path}: is the folder of an edgeft {read_manifest(path)['stage']} stage, not of a build "
            "or bench; choose another --out"
        )
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
