"""`edgeft bench --remote [user@]host`: measure on the device itself over SSH and bring the report back.

The device needs only what it needs anyway: an SSH server, a POSIX shell with ``tar``, ``ln`` and
``mkdir`` (a Raspberry Pi OS or Termux install has them) and the torch-free ``edgeft[device]``
install. This side uses the system's OpenSSH client, so ``~/.ssh/config``, agents, jump hosts and
keys work as they do for ``ssh`` itself; ``--remote-ssh`` replaces the ``ssh`` command line (as
rsync's ``-e`` does), e.g. ``"ssh -p 2222 -i ~/.ssh/pi"``.

Steps, each one ``ssh`` call:

1. check that ``edgeft`` runs there and learn its version;
2. upload the files the device does not have yet. Files are kept on the device by content
   (``WORKDIR/objects/<sha256>``), so benching the same artifact again copies nothing; an upload is
   unpacked into a scratch folder and moved into place only when complete, so a cut connection never
   leaves a truncated object behind;
3. lay out a run folder of hard links (``ref/``, ``art/<target>/``, ``bench.toml``), run
   ``edgeft bench`` there with the same [bench] settings and gates, its output streamed here;
4. read the run's ``out/`` folder back (a tar over the SSH channel) and delete the run folder.

The report that comes back is the device's: its CPU, RAM, read bandwidth and runtime builds. With
``--build`` it is also stored as a device run of the build (see :mod:`edgeft.bench.device_runs`).

The device is not trusted with anything on this machine. ``--remote-edgeft``, ``--remote-dir`` and
EDGEFT_RUN_ID must not read as options or paths out of the work folder; the ssh command line ends its
options with ``--``. What comes back is bounded in size and entries and read as it streams in: only
regular files and folders under ``out/`` are accepted (a link, a device file or a path out of ``out/``
refuses the whole tar), only ``report.json`` and ``report.png`` are used, the report is refused unless
it has the shape read here, and every string in it is made safe to print and render before use.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .bench.device_runs import from_report
from .bench.reference import ARRAYS, META
from .errors import ConfigError, InternalError, first_line
from .files import sha256_file, write_atomic
from .formats import shipped_name
from .report import Report, render_junit, render_markdown
from .untrusted import (
    ANY,
    BOOL,
    INT,
    NUM,
    STR,
    Oversized,
    ShapeError,
    check_shape,
    cleaned,
    list_of,
    map_of,
    optional,
    safe_text,
)

DEFAULT_WORKDIR = ".cache/edgeft/remote"  # relative to the login directory (the user's home)

# What a device may send back. Its out/ folder holds report.json (tens to hundreds of KB: answers and
# timing samples per target), a plot and a few small manifests; these bounds are far above that and far
# below what would exhaust this machine. report.json is parsed whole, and JSON made of tiny lists or
# objects takes ~20 times its size in memory: it has its own bound on both.
MAX_TAR_BYTES = 64 << 20
MAX_TAR_ENTRIES = 1000
MAX_REPORT_BYTES = 16 << 20
MAX_REPORT_CONTAINERS = 200_000  # '[' and '{' in report.json; a report has one object per answer
MAX_REPORT_VALUES = 1_000_000  # ',' in report.json, about its number of values
MAX_PLOT_BYTES = 16 << 20
MAX_OUTPUT_BYTES = 16 << 20  # stdout of `edgeft --version` and of the object listing
MAX_DEPTH = 32  # JSON nesting; a report is about eight levels deep
_STDERR_TAIL = 64 << 10  # the last bytes of a command's stderr, for an error message
_PNG = b"\x89PNG\r\n\x1a\n"
# EDGEFT_RUN_ID names the run's folder on the device, which is removed with `rm -rf` afterwards.
_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _check_option(option: str, value: str, expected: str) -> None:
    """Refuse a --remote-edgeft / --remote-dir value that ssh or the device's shell would read as
    something else than a command or a folder (CI jobs build these flags from variables)."""
    if not value.strip():
        raise ConfigError(f"{option}: empty; expected {expected}")
    if value.lstrip().startswith("-"):
        raise ConfigError(
            f"{option} {value!r}: starts with '-', which ssh or the device's shell would take as an option; "
            f"expected {expected}"
        )
    if not value.isprintable():
        raise ConfigError(f"{option} {value!r}: holds a control character (newline, NUL, ...); expected {expected}")


@dataclass
class Remote:
    host: str
    ssh: tuple[str, ...] = ("ssh",)
    edgeft: str = "edgeft"
    workdir: str = DEFAULT_WORKDIR

    def __post_init__(self) -> None:
        if not self.host or self.host.startswith("-") or any(c.isspace() or not c.isprintable() for c in self.host):
            raise ConfigError(f"--remote {self.host!r}: expected [user@]host (an ssh destination)")
        _check_option("--remote-edgeft", self.edgeft, "edgeft's command on the device, e.g. ~/venv/bin/edgeft")
        _check_option("--remote-dir", self.workdir, "a folder on the device, e.g. .cache/edgeft/remote")
        if not self.ssh:
            raise ConfigError("--remote-ssh: empty command; expected e.g. 'ssh -p 2222'")
        if shutil.which(self.ssh[0]) is None:
            raise ConfigError(
                f"--remote-ssh: {self.ssh[0]!r} not found on this machine; install an OpenSSH client (ssh) "
                "or give its command line with --remote-ssh"
            )

    def argv(self, command: str) -> list[str]:
        # OpenSSH reads options again after the destination when more arguments follow it (ssh.c jumps
        # back to getopt), so a command starting with '-' would be an ssh option: -oProxyCommand=...
        # runs a program on this machine. A `--` before the destination ends the options and also turns
        # that second reading off (ssh.c's opt_terminated; `ssh -G -- host -oProxyCommand=x` shows no
        # proxy command), so the destination and the command are taken as given. A --remote-ssh line
        # that already ends in `--` gets no second one: that one would be read as the destination.
        end = [] if self.ssh[-1] == "--" else ["--"]
        return [*self.ssh, *end, self.host, command]

    def start(
        self, command: str, *, stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.PIPE, echo: bool = False
    ) -> tuple[subprocess.Popen, _Stderr]:
        """``command`` running in the remote shell, with a thread draining its stderr (see :class:`_Stderr`)."""
        try:
            proc = subprocess.Popen(self.argv(command), stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
        except OSError as e:
            raise ConfigError(f"--remote-ssh: cannot run {self.ssh[0]!r}: {e}") from None
        return proc, _Stderr(proc.stderr, echo)

    def run(
        self, command: str, what: str, *, stream: bool = False, keep_stdout: bool = True
    ) -> subprocess.CompletedProcess:
        """Run ``command`` in the remote shell and keep at most MAX_OUTPUT_BYTES of its stdout; ``stream``
        shows its stderr (progress, errors) here as it comes and drops its stdout (the summary table,
        printed again here from the report). ``what`` says what the command does, for messages."""
        keep = keep_stdout and not stream
        proc, errors = self.start(command, stdout=subprocess.PIPE if keep else subprocess.DEVNULL, echo=stream)
        out = b""
        try:
            if keep:
                out = _Capped(
                    proc.stdout, MAX_OUTPUT_BYTES, f"--remote {self.host}: while {what}, the device"
                ).read_all()
            proc.wait()
        except BaseException:
            _stop(proc)
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, errors.tail())

    def fail(self, what: str, proc: subprocess.CompletedProcess) -> ConfigError:
        err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
        detail = _short(err[-1]) if err else f"exit status {proc.returncode}"
        if proc.returncode == 255:
            return ConfigError(f"--remote {self.host}: ssh failed while {what}: {detail}")
        return ConfigError(f"--remote {self.host}: {what} failed there: {detail}")


def _quoted(text: str) -> str:
    """A name the device chose, quoted for a message (controls shown as escapes, not doubled by repr)."""
    return f"'{safe_text(text)}'"


def _short(text: str, limit: int = 240) -> str:
    """A line the device wrote, safe to print, at most ``limit`` characters."""
    text = safe_text(text.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _stop(proc: subprocess.Popen) -> None:
    """Kill ``proc`` (ssh) if it still runs and reap it: we stopped reading what it sends."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class _Stderr(threading.Thread):
    """Drains a command's stderr so the command never stalls on a full pipe, keeping only its last
    64 KB (for an error message); with ``echo`` it shows each line here as it comes, made safe for a
    terminal and marked ``remote:``, so a device can neither drive the terminal with escape sequences
    nor print lines that pass for this machine's own (``edgeft: error: ...``)."""

    def __init__(self, pipe: Any, echo: bool):
        super().__init__(daemon=True)
        self._pipe, self._echo, self._tail = pipe, echo, b""
        self.start()

    def run(self) -> None:
        pending = b""
        while chunk := self._pipe.read1(1 << 16):
            self._tail = (self._tail + chunk)[-_STDERR_TAIL:]
            if self._echo:
                *lines, pending = (pending + chunk).split(b"\n")
                if len(pending) > _STDERR_TAIL:  # a "line" that never ends: show it in pieces
                    lines, pending = [*lines, pending], b""
                for line in lines:
                    self._show(line)
        if self._echo and pending:
            self._show(pending)

    @staticmethod
    def _show(line: bytes) -> None:
        text = line.decode(errors="replace").rstrip("\r")
        print(f"remote: {safe_text(text)}", file=sys.stderr, flush=True)

    def tail(self) -> bytes:
        # ssh has exited; a process it left behind (a ControlPersist master) may hold the pipe open
        self.join(timeout=10)
        return self._tail


class _Capped:
    """A pipe that refuses to yield more than ``limit`` bytes in all: ConfigError(``who`` sent more ...)."""

    def __init__(self, pipe: Any, limit: int, who: str):
        self._pipe, self._limit, self._who, self.seen = pipe, limit, who, 0

    def read(self, size: int = -1) -> bytes:
        data = self._pipe.read(size if size is not None and size >= 0 else 1 << 16)
        self.seen += len(data)
        if self.seen > self._limit:
            raise ConfigError(f"{self._who} sent more than {self._limit >> 20} MB; refusing the rest")
        return data

    def read_all(self) -> bytes:
        parts = []
        while chunk := self.read(1 << 16):
            parts.append(chunk)
        return b"".join(parts)

    def drain(self) -> None:
        while self.read(1 << 16):
            pass


def _q(path: str) -> str:
    return shlex.quote(path)


def files_to_send(reference_dir: Path, artifacts: list[tuple[str, Path]], extra: dict[str, Path]) -> dict[str, Path]:
    """Remote path (relative to the run folder) → local file, for the reference, artifacts and ``extra``."""
    # A stored reference is these two files to the device; nothing else in the folder is sent (a
    # link left there, e.g. to a key, would otherwise be read and uploaded to the device).
    out: dict[str, Path] = {f"ref/{name}": Path(reference_dir) / name for name in (ARRAYS, META)}
    for name, path in artifacts:
        if path.is_dir():  # a folder artifact: every file but the stage manifest
            for f in sorted(path.rglob("*")):
                if f.is_file() and not f.name.startswith(".") and f.name != "manifest.json":
                    out[f"art/{name}/{f.relative_to(path).as_posix()}"] = f
        else:  # a one-file artifact, under the name its folder is found by on the device
            out[f"art/{name}/{shipped_name(path) or path.name}"] = path
    out.update(extra)
    return out


def bench_toml(cfg: Any) -> str:
    """The [bench] and [gates] tables of ``cfg`` as TOML, so the device measures with the same settings."""
    lines = []
    for table in ("bench", "gates"):
        lines.append(f"[{table}]")
        part = getattr(cfg, table)
        for f in fields(part):
            v = getattr(part, f.name)
            if v is None:
                continue
            if isinstance(v, bool):
                lines.append(f"{f.name} = {'true' if v else 'false'}")
            elif isinstance(v, (int, float)):
                lines.append(f"{f.name} = {v!r}")
            elif isinstance(v, str):
                lines.append(f"{f.name} = {json.dumps(v)}")
        lines.append("")
    return "\n".join(lines)


def check_run_id(run_id: str) -> str:
    """``run_id`` (from EDGEFT_RUN_ID or made here) as a safe folder name: it reaches `rm -rf` on the device."""
    if not _RUN_ID.fullmatch(run_id) or run_id in (".", ".."):
        raise ConfigError(
            f"EDGEFT_RUN_ID {run_id!r}: expected 1 to 64 letters, digits, '.', '_' or '-' (not '.' or '..'); "
            "it names the run's folder on the --remote device"
        )
    return run_id


def remote_bench(
    remote: Remote,
    cfg: Any,
    reference_dir: Path,
    artifacts: list[tuple[str, Path]],
    out_dir: Path,
    *,
    run_id: str,
    threads: int | None = None,
    device_file: Path | None = None,
    context: int | None = None,
    log: Any = None,
) -> Report:
    """Bench ``artifacts`` against the stored ``reference_dir`` on ``remote`` and return the device's
    report, checked and made safe (see :func:`device_report`); its plot, if it sent one, is written to
    ``out_dir`` (which must already be an edgeft bench folder). Nothing else the device sends is kept."""
    say = log or (lambda msg: print(msg, file=sys.stderr))
    check_run_id(run_id)
    remote_version = _remote_version(remote)
    digests = _send_files(remote, cfg, reference_dir, artifacts, device_file, run_id, say)
    run_dir = f"{remote.workdir}/runs/{run_id}"
    cmd = [remote.edgeft, "bench", "--reference", "ref", "--out", "out", "--config", "bench.toml"]
    for name, _ in artifacts:
        cmd += ["--artifact", f"art/{name}"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if device_file is not None:
        cmd += ["--device", "device.toml"]
    if context is not None:
        cmd += ["--context", str(context)]
    say(f"remote {remote.host}: edgeft {remote_version} bench {', '.join(n for n, _ in artifacts)}")
    run = remote.run(_run_script(remote, run_dir, digests, cmd, run_id), "benching", stream=True)
    try:
        _check_bench_exit(remote, run.returncode)
        # 4. bring the report back.
        report, plot = _fetch_report(remote, run_dir, [n for n, _ in artifacts])
    finally:
        remote.run(f"rm -rf {_q(run_dir)}", "removing the run folder", keep_stdout=False)
    if plot is not None:
        write_atomic(Path(out_dir) / "report.png", plot)  # replaced by this machine's plot where it can draw one
    report.remote = {
        "host": remote.host,
        # Only the program's name: the whole --remote-ssh line can hold key paths, jump hosts and
        # anything else typed there, and report.json is shared (CI artifacts, pull requests).
        "ssh": Path(remote.ssh[0]).name,
        "edgeft_version": remote_version,
        "workdir": remote.workdir,
    }

    if remote_version != __version__:
        report.warnings = [
            *(report.warnings or []),
            f"--remote: the device runs edgeft {remote_version}, this machine {__version__}",
        ]
    return report


def _remote_version(remote: Remote) -> str:
    """1. edgeft is there, and which version."""
    probe = remote.run(f"{remote.edgeft} --version", "checking edgeft there")
    if probe.returncode == 127 or (probe.returncode != 0 and probe.returncode != 255):
        raise ConfigError(
            f"--remote {remote.host}: `{remote.edgeft}` does not run there; install it with "
            "`pip install 'edgeft[device]'` or give its path with --remote-edgeft"
        )
    if probe.returncode != 0:
        raise remote.fail("connecting", probe)
    return _short(probe.stdout.decode(errors="replace").strip().rsplit(" ", 1)[-1], 64)


def _send_files(
    remote: Remote,
    cfg: Any,
    reference_dir: Path,
    artifacts: list[tuple[str, Path]],
    device_file: Path | None,
    run_id: str,
    say: Callable[[str], Any],
) -> dict[str, str]:
    """2. upload what the device lacks; run-folder path → content digest of every file the run needs."""
    with tempfile.TemporaryDirectory(prefix="edgeft-remote-") as tmp:
        toml = Path(tmp) / "bench.toml"
        toml.write_text(bench_toml(cfg))
        extra = {"bench.toml": toml}
        if device_file is not None:
            extra["device.toml"] = Path(device_file)
        files = files_to_send(reference_dir, artifacts, extra)
        digests = {rel: sha256_file(path) for rel, path in files.items()}
        objects = f"{remote.workdir}/objects"
        listing = remote.run(f"mkdir -p {_q(objects)} && ls -1 {_q(objects)}", f"listing {objects}")
        if listing.returncode != 0:
            raise remote.fail(f"listing {objects}", listing)
        have = set(listing.stdout.decode(errors="replace").split())
        missing = {d: files[rel] for rel, d in digests.items() if d not in have}
        size = sum(p.stat().st_size for p in missing.values())
        say(
            f"remote {remote.host}: uploading {len(missing)} of {len(files)} files ({size / 1e6:.1f} MB); "
            f"{len(files) - len(missing)} already there"
        )
        if missing:
            _upload(remote, objects, missing, run_id)
    return digests


def _run_script(remote: Remote, run_dir: str, digests: dict[str, str], cmd: list[str], run_id: str) -> str:
    """3. the shell line that lays out the run folder from the uploaded objects and benches there."""
    script = [f"rm -rf {_q(run_dir)}", f"mkdir -p {_q(run_dir)}", f"cd {_q(run_dir)}"]
    for rel, d in sorted(digests.items()):
        parent = os.path.dirname(rel)
        if parent:
            script.append(f"mkdir -p {_q(parent)}")
        # a hard link costs no space; a file system without them gets a copy
        src = f"../../objects/{d}"
        script.append(f"{{ ln {_q(src)} {_q(rel)} 2>/dev/null || cp {_q(src)} {_q(rel)}; }}")
    edgeft_cmd = " ".join([_q(c) for c in cmd[1:]])
    script.append(f"EDGEFT_RUN_ID={_q(run_id)} {remote.edgeft} {edgeft_cmd}")
    return " && ".join(script[:-1]) + " && " + script[-1]


def _check_bench_exit(remote: Remote, returncode: int) -> None:
    if returncode == 255:
        raise ConfigError(f"--remote {remote.host}: the SSH connection failed during the bench (see above)")
    if returncode not in (0, 1):  # 1: a gate failed there, the report is still wanted
        what = {2: "refused its input", 3: "hit an internal error"}.get(returncode, "failed")
        exc = ConfigError if returncode == 2 else InternalError
        raise exc(f"--remote {remote.host}: edgeft bench {what} there (exit status {returncode}; its message is above)")


def _upload(remote: Remote, objects: str, missing: dict[str, Path], run_id: str) -> None:
    """Stream ``missing`` (sha256 → file) as one tar into a scratch folder, then move it into place."""
    incoming = f"{objects}/.incoming-{run_id}"
    command = (
        f"rm -rf {_q(incoming)} && mkdir -p {_q(incoming)} && tar -xf - -C {_q(incoming)} && "
        f"mv {_q(incoming)}/* {_q(objects)}/ && rmdir {_q(incoming)}"
    )
    proc, errors = remote.start(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        assert proc.stdin is not None
        with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for digest, path in missing.items():
                # The content of the file that was hashed (a link is followed, as the hash followed
                # it), under its digest, without this machine's user and group names.
                with open(path, "rb") as fh:
                    info = tar.gettarinfo(arcname=digest, fileobj=fh)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, fh)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the remote side stopped reading; its exit status and stderr say why
    except BaseException:
        _stop(proc)
        raise
    if proc.wait() != 0:
        raise remote.fail("uploading", subprocess.CompletedProcess(proc.args, proc.returncode, b"", errors.tail()))


def _fetch_report(remote: Remote, run_dir: str, names: list[str]) -> tuple[Report, bytes | None]:
    """The device's report (checked, see :func:`device_report`) and plot (or None), read from a tar
    of its out/ folder as it streams in: nothing is held or written before the whole tar passed."""
    proc, errors = remote.start(f"cd {_q(run_dir)} && tar -cf - out")
    stream = _Capped(proc.stdout, MAX_TAR_BYTES, f"--remote {remote.host}: the device's report folder")
    broken = None
    try:
        try:
            files = _read_out_tar(stream, remote.host)
        except (tarfile.TarError, EOFError, ValueError) as e:  # ValueError: tarfile on a bad GNU sparse map
            files, broken = {}, e  # the exit status may explain it: read on to learn it
        stream.drain()  # tar's padding, or what follows a broken archive, counts towards the bound too
        proc.wait()
    except BaseException:
        _stop(proc)
        raise
    if proc.returncode != 0:
        raise remote.fail(
            "reading the report", subprocess.CompletedProcess(proc.args, proc.returncode, b"", errors.tail())
        )
    if broken is not None:
        raise ConfigError(
            f"--remote {remote.host}: the report folder from the device is not a valid tar ({_short(str(broken))})"
        )
    if "out/report.json" not in files:
        raise ConfigError(f"--remote {remote.host}: the device's bench wrote no out/report.json")
    plot = files.get("out/report.png")
    if plot is not None and not plot.startswith(_PNG):
        plot = None  # not a PNG: this machine draws its own or there is none
    return device_report(files["out/report.json"], remote.host, names), plot


# The files of the device's out/ that are used here, with their size bounds. Its report.md and junit.xml
# are written again here from the checked report; its manifest.json and bench-*/ stage folders stay
# there (the bench folder here has its own manifest, and a device's stage records must not become
# this machine's cache). Other regular files and folders are skipped unread; anything else refuses
# the whole tar.
_WANTED = {"out/report.json": MAX_REPORT_BYTES, "out/report.png": MAX_PLOT_BYTES}


def _read_out_tar(stream: Any, host: str) -> dict[str, bytes]:
    """The wanted files of a tar of ``out/``, each header checked before anything of it is read."""
    where = f"--remote {host}: the report folder from the device"
    taken: dict[str, bytes] = {}
    seen: set[str] = set()
    # "r|": a stream, read once, in order, never decompressed; each member's data is read (or skipped)
    # only after its header passed.
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for count, member in enumerate(tar, 1):
            if count > MAX_TAR_ENTRIES:
                raise ConfigError(f"{where} has more than {MAX_TAR_ENTRIES} entries; a report folder has a few")
            name = _checked_entry(member, where)
            if name in seen:
                raise ConfigError(f"{where} holds {_quoted(name)} twice")
            seen.add(name)
            if member.size > MAX_TAR_BYTES or (name in _WANTED and member.size > _WANTED[name]):
                limit = _WANTED.get(name, MAX_TAR_BYTES)
                raise ConfigError(
                    f"{where} holds {_quoted(name)} of {member.size} bytes; at most {limit >> 20} MB is accepted"
                )
            if member.isreg() and name in _WANTED:
                fh = tar.extractfile(member)
                assert fh is not None
                taken[name] = fh.read()
    return taken


def _checked_entry(member: tarfile.TarInfo, where: str) -> str:
    """The entry's name, if it is a regular file or a folder at a clean path under ``out/``."""
    name = member.name
    if not (member.isreg() or member.isdir()):
        if member.issym():
            kind = f"a symbolic link (to {_quoted(member.linkname)})"
        elif member.islnk():
            kind = f"a hard link (to {_quoted(member.linkname)})"
        elif member.ischr() or member.isblk():
            kind = "a device file"
        elif member.isfifo():
            kind = "a fifo"
        else:
            kind = f"an entry of type {member.type!r}"
        raise ConfigError(f"{where} holds {_quoted(name)}, {kind}; only regular files and folders are accepted")
    if safe_text(name) != name:
        raise ConfigError(f"{where} holds an entry whose name has control characters ({_quoted(name)}); refused")
    parts = name.split("/")
    if parts[0] != "out" or any(p in ("", ".", "..") for p in parts[1:]):
        raise ConfigError(f"{where} holds {_quoted(name)}, a path outside out/ (absolute, or with '..'); refused")
    return name


# ------------------------------------------------------------------------------------- the report
#
# What this machine reads of a device's report (to write report.json/md, junit.xml and the plot, print
# the summary, judge the gates and store a device run), so that a report missing any of it is refused
# with its place named instead of failing half-way through writing. Absent keys read with .get() are
# optional(); values only shown are ANY; values formatted as numbers are NUM.

_SPREAD = {"median": NUM, "min": NUM, "max": NUM}
_MACHINE = optional(
    {
        "cpu_model": optional(STR),
        "arch": optional(STR),
        "cores": optional(INT),
        "isa": optional(list_of(STR)),
        "ram_bytes": optional(NUM),
        "platform": optional(STR),
        "runtime_builds": optional(map_of(STR)),
    }
)
_TIMED = optional({"run_id": optional(STR), "timed_at": optional(STR), "machine": _MACHINE})
_LATENCY = {
    "threads": INT,
    "repeats": INT,
    "prompt_tokens": INT,
    "decode_tokens": INT,
    "runtime_version": STR,
    "ttft_ms": _SPREAD,
    "prefill_tok_s": _SPREAD,
    "decode_tok_s": _SPREAD,
}
_CPU_STATE = optional({"temperature_c": optional(map_of({"c": NUM})), "cpu_mhz": optional(map_of(NUM))})
_GATE = {"name": STR, "description": STR, "limit": ANY, "passed": BOOL}
_GOLDEN = {
    "question": STR,
    "expected": STR,
    "reference": STR,
    "reference_correct": ANY,
    "artifact": STR,
    "artifact_correct": ANY,
    "artifact_stopped": ANY,
}


def _gate_value(value: Any, path: str) -> None:
    if value is not None and not isinstance(value, (bool, int, float)):
        raise ShapeError(f"{path}: expected a number, true/false or null, got {value!r:.40}")


_INTERVAL = optional(list_of(NUM))
_PAIRED = optional(
    {
        "n": INT,
        "right_to_wrong": INT,
        "wrong_to_right": INT,
        "difference": NUM,
        "interval": list_of(NUM),
        "p_value": NUM,
    }
)
_TARGET = {
    "target": STR,
    "passed": BOOL,
    "artifact": {
        "path": STR,
        "quant": STR,
        "size_bytes": NUM,
        "runtime": optional(STR),
        "tensor_types": optional(map_of(ANY)),
    },
    "fidelity": {
        "kl_divergence_mean": NUM,
        "artifact_stop_rate": optional(NUM),
        "task_accuracy_artifact": optional(NUM),
        "kl_divergence_interval": _INTERVAL,
        "top1_agreement_interval": _INTERVAL,
        "task_accuracy_paired": _PAIRED,
    },
    "latency": {
        "threads": INT,
        "decode_tok_s": NUM,
        "speedup": NUM,
        "artifact": _LATENCY,
        "timed": _TIMED,
        "device_state": optional(
            {"affinity": optional({"pinned_to": optional(list_of(INT))}), "before": _CPU_STATE, "after": _CPU_STATE}
        ),
        "sustained": optional(
            {"first": {"tok_s": NUM}, "last": {"tok_s": NUM}, "change_pct": NUM, "seconds": NUM, "tokens": NUM}
        ),
    },
    "memory": {"peak_rss_bytes": NUM, "load_s": NUM},
    "roofline": {"fraction": optional(NUM), "read_bandwidth_gb_s": _SPREAD},
    "gates": list_of({**_GATE, "value": _gate_value, "detail": optional(STR)}),
    "golden": list_of(_GOLDEN),
}
_LADDER = {
    "stage": STR,
    "runtime": STR,
    "quant": STR,
    "size_bytes": optional(NUM),
    "kl_divergence_mean": NUM,
    "kl_divergence_p99": NUM,
    "top1_agreement": optional(NUM),
    "perplexity_artifact": NUM,
    "perplexity_artifact_err": NUM,
    "perplexity_delta_pct": NUM,
    "task_accuracy_artifact": optional(NUM),
    "kl_divergence_interval": _INTERVAL,
    "top1_agreement_interval": _INTERVAL,
    "task_accuracy_paired": _PAIRED,
}
_DEVICE = {
    "profile": {
        "name": STR,
        "key": STR,
        "cores": ANY,
        "threads": ANY,
        "isa": list_of(STR),
        "app_ram_gb": NUM,
        "app_ram_source": STR,
        "effective_bandwidth_gb_s": NUM,
        "effective_bandwidth_source": STR,
    },
    "context_tokens": ANY,
    "targets": map_of(
        {
            "fits": ANY,
            "format_supported": ANY,
            "ram_needed_bytes": NUM,
            "app_ram_bytes": NUM,
            "decode_tok_s": optional(NUM),
            "decode_basis": optional(STR),
            "decode_model": optional(
                {"basis": optional(STR), "estimate": optional(NUM), "low": optional(NUM), "high": optional(NUM)}
            ),
            "method": optional(STR),
            "measured_decode_tok_s_here": NUM,
        }
    ),
}
_REPORT = {
    "passed": BOOL,
    "run_id": optional(STR),
    "warnings": optional(list_of(STR, max_len=100)),  # each one a line on the terminal
    "reference": {
        "path": STR,
        "size_bytes": NUM,
        "top_k": INT,
        "dtype": optional(STR),
        "dtype_reason": optional(STR),
        "performance": {"latency": _LATENCY, "peak_rss_bytes": NUM, "load_s": NUM},
        "machine": _MACHINE,
        "timed": _TIMED,
    },
    "targets": list_of(_TARGET, non_empty=True),
    "ladder": list_of(_LADDER),
    "eval": {"examples": INT, "scored_positions": INT},
    "machine": _MACHINE,
    "device": optional(_DEVICE),
    "stages": optional(list_of({"stage": STR, "seconds": NUM, "cached": ANY})),
}
# Kept from a device's report; anything else (a build's training or merge sections, comparisons, device
# runs) is never part of a device's bench and is dropped rather than rendered.
_REPORT_KEYS = {"schema_version", "edgeft_version", *_REPORT}


def device_report(raw: bytes, host: str, names: list[str]) -> Report:
    """The report a device sent as ``raw`` report.json, for the targets ``names`` that were sent: every
    string made safe to print (see :mod:`edgeft.untrusted`), the fields read here checked. Malformed,
    nested too deep, or about other targets: ConfigError naming the device and the place."""
    where = f"--remote {host}: the device's report.json"
    # Counted on the raw bytes (brackets and commas inside strings too, an over-count) so that a file
    # that would decode into millions of small objects is refused before it is decoded.
    if raw.count(b"[") + raw.count(b"{") > MAX_REPORT_CONTAINERS:
        raise ConfigError(f"{where} holds more than {MAX_REPORT_CONTAINERS} lists and objects; a report has far fewer")
    if raw.count(b",") > MAX_REPORT_VALUES:
        raise ConfigError(f"{where} holds more than {MAX_REPORT_VALUES} values; a report has far fewer")
    try:
        decoded = json.loads(raw)
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to read") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        raise ConfigError(f"{where} is not JSON ({_short(first_line(e))})") from None
    if not isinstance(decoded, dict):
        raise ConfigError(f"{where} is not a JSON object (it holds a {type(decoded).__name__})")
    try:
        checked = cleaned({k: v for k, v in decoded.items() if k in _REPORT_KEYS}, MAX_DEPTH, MAX_REPORT_VALUES)
        check_shape(checked, _REPORT)
    except Oversized as e:
        raise ConfigError(f"{where} is {e}") from None
    except ShapeError as e:
        raise ConfigError(f"{where}: {e}") from None
    report = Report.from_json(checked)
    report.first_at_top = True  # the first target's sections at the top come from its checked entry
    _check_names(report, names, where)
    # The checks above cover what is read here; rendering once more catches what they cannot say
    # (e.g. a value of the right type that a format rejects) before anything is written.

    try:
        render_markdown(report)
        render_junit(report)
        from_report(report.to_json(), "check", "check")
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as e:
        raise ConfigError(f"{where} does not read as an edgeft report ({type(e).__name__}: {_short(str(e))})") from None
    return report


def _check_names(report: Report, names: list[str], where: str) -> None:
    """Every target, ladder row and device projection is about an artifact that was sent, once."""
    targets = [t.target for t in report.targets]
    for name in targets:
        if name not in names or targets.count(name) > 1:
            raise ConfigError(
                f"{where}: target {_quoted(name)} {'twice' if name in names else 'was not sent'}; "
                f"expected {', '.join(names)}"
            )
    for row in report.ladder:
        if row["stage"] not in ("reference", *names):
            raise ConfigError(
                f"{where}: ladder stage {_quoted(row['stage'])} is neither the reference nor a target sent"
            )
    for name in (report.device or {}).get("targets", {}):
        if name not in names:
            raise ConfigError(f"{where}: device projection for {_quoted(name)}, which was not sent")
