"""Helpers for the hostile-input tests (``test_hostile_*.py``): run the real CLI in its own process,
measure its peak RSS, and check that it refused cleanly and touched nothing outside its output.

A hostile case passes when the process exits 2 (bad input) or 3 (an internal error, never 1, which
is a failed gate's status), prints exactly one ``edgeft: error:`` line and no traceback, and every
file outside the command's own output is as it was (content, and where a link points).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_bytes: int  # the process's own maximum resident set (getrusage of that child alone)


# Runs the command and reports its peak RSS. A child's ru_maxrss starts at the RSS of the process
# that forked it (the forked copy of its memory counts until exec), so measuring from pytest (hundreds
# of MB of models and fixtures) would inflate every figure: this small launcher, exec'd fresh, forks
# the command instead and writes the command's own figure to the file named in argv[1].
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))  # Linux reports kilobytes
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def run_edgeft(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> Run:
    """``python -m edgeft.cli ARGS`` in ``cwd``; its exit status, output and its own peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "rss"
        cmd = [sys.executable, "-S", "-c", _LAUNCHER, str(rss_file), sys.executable, "-m", "edgeft.cli", *args]
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "EDGEFT_RAISE_ERRORS": "", **(env or {})},
            start_new_session=True,  # a timeout kills the command with its launcher
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        peak = int(rss_file.read_text()) if rss_file.is_file() else 0
    return Run(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), peak)


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
