"""Helpers for the hostile-input tests (``test_hostile_*.py``): check that the real CLI (run by
``tests/cli.py``) refused cleanly and touched nothing outside its output.

A hostile case passes when the process exits 2 (bad input) or 3 (an internal error, never 1, which
is a failed gate's status), prints exactly one ``edgeft: error:`` line and no traceback, and every
file outside the command's own output is as it was (content, and where a link points).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .cli import Run


def assert_refused(run: Run, *fragments: str, code: int = 2) -> str:
    """Exit ``code``, one ``edgeft: error:`` line holding every fragment, no traceback; the line."""
    assert run.returncode == code, f"exit {run.returncode}, expected {code}\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("edgeft: error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    # nothing after the error line: it is the last thing the user reads
    assert lines[-1] == errors[0], run.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "\x1b" not in run.stderr, "an escape sequence reached the terminal"
    return errors[0]


def snapshot(*roots: Path, skip: Path | None = None) -> dict[str, str]:
    """Every entry under ``roots`` (``skip`` and what is inside it excluded): a file by its sha256, a
    link by its target, a folder by its name, so that any write, replacement or new entry shows."""
    seen: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        for p in [root, *sorted(root.rglob("*"))] if root.exists() else []:
            if skip is not None and (p == skip or skip in p.parents):
                continue
            if p.is_symlink():
                seen[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                seen[str(p)] = "dir"
    return seen
