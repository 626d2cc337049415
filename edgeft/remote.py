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
4. copy the run's ``out/`` folder back (tar over the SSH channel) and delete the run folder.

The report that comes back is the device's: its CPU, RAM, read bandwidth and runtime builds. With
``--build`` it is also stored as a device run of the build (see :mod:`edgeft.bench.device_runs`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, InternalError

DEFAULT_WORKDIR = ".cache/edgeft/remote"  # relative to the login directory (the user's home)
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

    def run(self, command: str, *, stdin: bytes | None = None, stream: bool = False) -> subprocess.CompletedProcess:
        """Run ``command`` in the remote shell; ``stream`` passes its stderr (progress, errors) through
        to ours and keeps its stdout (the summary table, printed again here from the report)."""
        try:
            return subprocess.run(
                self.argv(command),
                input=stdin,
                stdout=subprocess.PIPE,
                stderr=None if stream else subprocess.PIPE,
                check=False,
            )
        except OSError as e:
            raise ConfigError(f"--remote-ssh: cannot run {self.ssh[0]!r}: {e}") from None

    def fail(self, what: str, proc: subprocess.CompletedProcess) -> ConfigError:
        err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
        detail = err[-1] if err else f"exit status {proc.returncode}"
        if proc.returncode == 255:
            return ConfigError(f"--remote {self.host}: ssh failed while {what}: {detail}")
        return ConfigError(f"--remote {self.host}: {what} failed there: {detail}")


def _q(path: str) -> str:
    return shlex.quote(path)


def files_to_send(reference_dir: Path, artifacts: list[tuple[str, Path]], extra: dict[str, Path]) -> dict[str, Path]:
    """Remote path (relative to the run folder) → local file, for the reference, artifacts and ``extra``."""
    out: dict[str, Path] = {}
    for f in sorted(Path(reference_dir).rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            out[f"ref/{f.relative_to(reference_dir).as_posix()}"] = f
    for name, path in artifacts:
        if path.is_dir():  # an ONNX folder: every file but the stage manifest
            for f in sorted(path.rglob("*")):
                if f.is_file() and not f.name.startswith(".") and f.name != "manifest.json":
                    out[f"art/{name}/{f.relative_to(path).as_posix()}"] = f
        else:  # a GGUF file: the name a folder artifact is found by
            out[f"art/{name}/model.gguf"] = path
    out.update(extra)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bench_toml(cfg: Any) -> str:
    """The [bench] and [gates] tables of ``cfg`` as TOML, so the device measures with the same settings."""
    from dataclasses import fields

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
) -> dict[str, Any]:
    """Bench ``artifacts`` against the stored ``reference_dir`` on ``remote``; the device's report
    folder is written to ``out_dir`` (which must already be an edgeft bench folder) and returned."""
    say = log or (lambda msg: print(msg, file=sys.stderr))
    check_run_id(run_id)

    # 1. edgeft is there, and which version.
    probe = remote.run(f"{remote.edgeft} --version")
    if probe.returncode == 127 or (probe.returncode != 0 and probe.returncode != 255):
        raise ConfigError(
            f"--remote {remote.host}: `{remote.edgeft}` does not run there; install it with "
            "`pip install 'edgeft[device]'` or give its path with --remote-edgeft"
        )
    if probe.returncode != 0:
        raise remote.fail("connecting", probe)
    remote_version = probe.stdout.decode(errors="replace").strip().rsplit(" ", 1)[-1]

    # 2. upload what the device lacks.
    with tempfile.TemporaryDirectory(prefix="edgeft-remote-") as tmp:
        toml = Path(tmp) / "bench.toml"
        toml.write_text(bench_toml(cfg))
        extra = {"bench.toml": toml}
        if device_file is not None:
            extra["device.toml"] = Path(device_file)
        files = files_to_send(reference_dir, artifacts, extra)
        digests = {rel: _sha256(path) for rel, path in files.items()}
        objects = f"{remote.workdir}/objects"
        listing = remote.run(f"mkdir -p {_q(objects)} && ls -1 {_q(objects)}")
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

    # 3. lay out the run folder and bench there.
    run_dir = f"{remote.workdir}/runs/{run_id}"
    script = [f"rm -rf {_q(run_dir)}", f"mkdir -p {_q(run_dir)}", f"cd {_q(run_dir)}"]
    for rel, d in sorted(digests.items()):
        parent = os.path.dirname(rel)
        if parent:
            script.append(f"mkdir -p {_q(parent)}")
        # a hard link costs no space; a file system without them gets a copy
        src = f"../../objects/{d}"
        script.append(f"{{ ln {_q(src)} {_q(rel)} 2>/dev/null || cp {_q(src)} {_q(rel)}; }}")
    cmd = [remote.edgeft, "bench", "--reference", "ref", "--out", "out", "--config", "bench.toml"]
    for name, _ in artifacts:
        cmd += ["--artifact", f"art/{name}"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if device_file is not None:
        cmd += ["--device", "device.toml"]
    if context is not None:
        cmd += ["--context", str(context)]
    edgeft_cmd = " ".join([_q(c) for c in cmd[1:]])
    script.append(f"EDGEFT_RUN_ID={_q(run_id)} {remote.edgeft} {edgeft_cmd}")
    say(f"remote {remote.host}: edgeft {remote_version} bench {', '.join(n for n, _ in artifacts)}")
    run = remote.run(" && ".join(script[:-1]) + " && " + script[-1], stream=True)
    try:
        if run.returncode == 255:
            raise ConfigError(f"--remote {remote.host}: the SSH connection failed during the bench (see above)")
        if run.returncode not in (0, 1):  # 1: a gate failed there, the report is still wanted
            what = {2: "refused its input", 3: "hit an internal error"}.get(run.returncode, "failed")
            exc = ConfigError if run.returncode == 2 else InternalError
            raise exc(
                f"--remote {remote.host}: edgeft bench {what} there (exit status {run.returncode}; its message is above)"
            )
        # 4. bring the report folder back.
        fetched = remote.run(f"cd {_q(run_dir)} && tar -cf - out")
        if fetched.returncode != 0:
            raise remote.fail("reading the report", fetched)
        _unpack_into(fetched.stdout, Path(out_dir))
    finally:
        remote.run(f"rm -rf {_q(run_dir)}")
    report_path = Path(out_dir) / "report.json"
    report = json.loads(report_path.read_text())
    report["remote"] = {
        "host": remote.host,
        "ssh": list(remote.ssh),
        "edgeft_version": remote_version,
        "workdir": remote.workdir,
    }
    from . import __version__

    if remote_version != __version__:
        report.setdefault("warnings", []).append(
            f"--remote: the device runs edgeft {remote_version}, this machine {__version__}"
        )
    return report


def _upload(remote: Remote, objects: str, missing: dict[str, Path], run_id: str) -> None:
    """Stream ``missing`` (sha256 → file) as one tar into a scratch folder, then move it into place."""
    incoming = f"{objects}/.incoming-{run_id}"
    command = (
        f"rm -rf {_q(incoming)} && mkdir -p {_q(incoming)} && tar -xf - -C {_q(incoming)} && "
        f"mv {_q(incoming)}/* {_q(objects)}/ && rmdir {_q(incoming)}"
    )
    proc = subprocess.Popen(remote.argv(command), stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        with tarfile.open(fileobj=proc.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for digest, path in missing.items():
                tar.add(str(path), arcname=digest, recursive=False)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the remote side stopped reading; its exit status and stderr say why
    err = proc.stderr.read() if proc.stderr else b""
    if proc.wait() != 0:
        raise remote.fail("uploading", subprocess.CompletedProcess(proc.args, proc.returncode, b"", err))


def _unpack_into(tar_bytes: bytes, out_dir: Path) -> None:
    """Unpack the device's ``out/`` into ``out_dir`` (entries replace same-named ones; nothing may
    point outside ``out_dir``: the 'data' filter refuses links, devices and absolute or ``..`` paths)."""
    from .stage import _replace_dir, _scratch_name

    scratch = out_dir / _scratch_name("remote", "tmp")
    scratch.mkdir()
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            tar.extractall(scratch, filter="data")
        src = scratch / "out"
        if not (src / "report.json").is_file():
            raise InternalError("--remote: the device's bench wrote no report.json")
        for child in src.iterdir():
            dst = out_dir / child.name
            if child.is_dir():
                _replace_dir(child, dst)
            else:
                os.replace(child, dst)
    except tarfile.TarError as e:
        raise InternalError(f"--remote: the report folder from the device is not a valid tar ({e})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
