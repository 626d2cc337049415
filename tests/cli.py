"""The one way tests run the real `edgeft` command: its own process, this checkout's code.

``run_edgeft`` waits for the command and returns its exit status, output and the command's own peak
RSS; ``start_edgeft`` hands back the running process for tests that kill it. Both run the CLI as
``edgeft`` (that is the program name in its messages), with ``PYTHONPATH`` pointing at this checkout
whatever is installed, and with ``EDGEFT_RAISE_ERRORS`` cleared so a bad input reaches the user's
path (one line, exit 2) rather than a traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# `prelude` runs before the CLI in the same process (e.g. to make `import torch` fail).
_MAIN = "import sys; sys.argv[0] = 'edgeft'; from edgeft.cli import main; main()"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_bytes: int  # the command's own maximum resident set (getrusage of that child alone)


# A child's ru_maxrss starts at the RSS of the process that forked it (the forked copy counts until
# exec), so measuring from pytest (hundreds of MB of models and fixtures) would inflate every figure:
# this small launcher, exec'd fresh, forks the command instead and writes the command's own figure to
# the file named in argv[1].
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


def _env(env: dict[str, str] | None) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "EDGEFT_RAISE_ERRORS": "", **(env or {})}


def _command(args: Sequence[str], prelude: str) -> list[str]:
    return [sys.executable, "-c", prelude + "\n" + _MAIN, *map(str, args)]


def run_edgeft(
    args: Sequence[str | Path],
    cwd: Path | None = None,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
    prelude: str = "",
) -> Run:
    """``edgeft ARGS`` in ``cwd``: its exit status, output and peak RSS; killed after ``timeout`` s."""
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "rss"
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _LAUNCHER, str(rss_file), *_command(args, prelude)],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(env),
            start_new_session=True,  # a timeout kills the command with its launcher and children
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        peak = int(rss_file.read_text()) if rss_file.is_file() else 0
    return Run(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), peak)


def start_edgeft(args: Sequence[str | Path], cwd: Path | None = None, **popen) -> subprocess.Popen:
    """``edgeft ARGS`` started in a process group of its own (a kill reaches its probe subprocesses)."""
    return subprocess.Popen(_command(args, ""), cwd=cwd, env=_env(None), start_new_session=True, **popen)
