"""Where a training run keeps its checkpoints so that the same run, started again, resumes.

A stage writes its payload into a private scratch folder that a killed run loses (the next run
removes it, see :mod:`edgeft.stage`). Checkpoints must outlive the run instead, and be found by the
next run of *the same* stage: they live beside the stage's final folder in ``.NAME.ckpt-KEY``, KEY
being the start of the stage's cache key (same base, data and parameters → same folder).

A run holds an exclusive ``flock`` on the folder's lock file while it trains. The kernel drops the
lock when the process dies, however it dies, so:

- a run that finds the folder unlocked resumes from its latest *complete* checkpoint (Trainer
  writes ``trainer_state.json`` last; a checkpoint killed mid-write lacks it and is skipped);
- a run that finds it locked (a live concurrent run of the same stage) trains without resuming, in
  its own scratch folder, and leaves the other run's checkpoints alone;
- checkpoint folders of other keys (a changed config) are removed when unlocked: only the newest
  configuration of a stage keeps its checkpoints. A finished run removes its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from .loading import read_json

LOCK = ".lock"
_STEP = re.compile(r"^checkpoint-(\d+)$")
_KEY = re.compile(r"^[0-9a-f]{16}$")  # folder_name's part of a stage key (sha256 hex)
# Files a Trainer checkpoint of a LoRA adapter needs to resume; trainer_state.json is written last.
_NEEDED = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


def folder_name(final_name: str, key: str) -> str:
    return f".{final_name}.ckpt-{key[:16]}"


def _try_lock(folder: Path) -> int | None:
    """An fd holding the exclusive lock of ``folder``, or None when a live process holds it."""
    try:
        fd = os.open(folder / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    except FileNotFoundError:  # the folder was removed meanwhile
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # Locked, but is it still the folder's lock file? (a sweep may have removed the folder between open and lock)
    try:
        same = os.fstat(fd).st_ino == os.stat(folder / LOCK).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def remove_stale(parent: Path, final_name: str, keep: str | None = None) -> list[Path]:
    """Remove ``parent/.NAME.ckpt-KEY`` folders other than ``keep`` that no live run holds.

    Only names :func:`folder_name` makes (16 hex digits of a key) are edgeft's: a user's
    ``.adapter.ckpt-backup`` beside the adapter is not touched."""
    removed = []
    prefix = f".{final_name}.ckpt-"
    for p in sorted(Path(parent).glob(f"{glob.escape(prefix)}*")):
        if p.name == keep or not _KEY.match(p.name[len(prefix) :]) or not p.is_dir() or p.is_symlink():
            continue
        fd = _try_lock(p)
        if fd is None:
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def resumable(final: Path, key: str) -> Iterator[Path | None]:
    """Yield this stage's checkpoint folder, locked for this process; None when another live run has it.

    On success the folder is removed (the stage's output is complete); on any exception it stays,
    with its checkpoints, for the next run.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    name = folder_name(final.name, key)
    remove_stale(final.parent, final.name, keep=name)
    folder = final.parent / name
    fd = None
    for _ in range(3):  # a concurrent sweep can remove a folder we just created; try again
        folder.mkdir(exist_ok=True)
        fd = _try_lock(folder)
        if fd is not None or (folder / LOCK).exists():
            break
    if fd is None:
        yield None
        return
    try:
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)


def latest(folder: Path | None) -> Path | None:
    """The checkpoint with the highest step whose files are all there, or None."""
    if folder is None or not Path(folder).is_dir():
        return None
    steps = sorted(
        ((int(m[1]), p) for p in Path(folder).iterdir() if (m := _STEP.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    for _, p in steps:
        if all((p / f).is_file() for f in _NEEDED) and _readable_state(p / "trainer_state.json"):
            return p
    return None


def _readable_state(path: Path) -> bool:
    try:
        return isinstance(read_json(path).get("global_step"), int)
    except (OSError, ValueError, AttributeError):
        return False


def step_of(checkpoint: Path | None) -> int:
    return int(_STEP.match(checkpoint.name)[1]) if checkpoint is not None else 0


def tokens_seen(checkpoint: Path | None) -> int:
    """Input tokens Trainer had counted when it wrote ``checkpoint`` (0 without one)."""
    if checkpoint is None:
        return 0
    try:
        return int(read_json(checkpoint / "trainer_state.json").get("num_input_tokens_seen") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
