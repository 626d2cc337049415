"""`edgeft bench --remote` against a hostile device, through the real CLI in its own process.

The device is a stand-in: ``fake-ssh`` (given with --remote-ssh) takes ssh's options, a ``--`` and the
destination like OpenSSH, logs its argv and runs the command with ``/bin/sh -c`` in a folder that
plays the device's home, where ``bin/edgeft`` (given with --remote-edgeft) answers ``--version`` and,
for ``bench``, writes ``out/report.json`` from the case's scenario and runs the case's ``bench.sh``
there (links, fifos...), so the device's own ``tar`` packs them. A case may instead answer the
``tar -cf - out`` itself: with a crafted tar (``answer.tar``) or a program that streams one
(``answer.py``, for streams too big to store).

Each case: exit 2 with one ``edgeft: error:`` line naming the device and what was wrong, no escape
sequence on the terminal, nothing outside --out changed (``victim.txt`` beside it included), nothing
left at --out. No model is needed: the device never measures anything, so the reference and the GGUF
file are the smallest the local checks accept.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeft import __version__

from .hostile import assert_refused, run_edgeft, snapshot

HOST = "pi@device"

FAKE_SSH = r'''#!{python} -S
"""ssh for the tests: options (and a `--`) as OpenSSH reads them, then the destination and the command."""
import json, os, shutil, sys

DEVICE = {device!r}
args = sys.argv[1:]
with open(os.path.join(DEVICE, "argv.log"), "a") as log:
    log.write(json.dumps(args) + "\n")
i = 0
while i < len(args) and args[i].startswith("-") and args[i] != "--":
    i += 2 if args[i] in ("-p", "-i", "-o", "-l", "-F", "-J") else 1
if i < len(args) and args[i] == "--":
    i += 1
command = " ".join(args[i + 1:])
if command.endswith("tar -cf - out"):
    if os.path.exists(os.path.join(DEVICE, "answer.py")):
        os.execv(sys.executable, [sys.executable, "-S", os.path.join(DEVICE, "answer.py")])
    if os.path.exists(os.path.join(DEVICE, "answer.tar")):
        with open(os.path.join(DEVICE, "answer.tar"), "rb") as fh:
            shutil.copyfileobj(fh, sys.stdout.buffer)
        sys.exit(0)
home = os.path.join(DEVICE, "home")
env = {{"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "LANG": "C.UTF-8"}}
os.chdir(home)
os.execve("/bin/sh", ["/bin/sh", "-c", command], env)
'''

FAKE_EDGEFT = r"""#!/bin/sh
# edgeft on the device: a version, and a bench that writes the scenario's out/ folder
if [ "$1" = "--version" ]; then echo "edgeft {version}"; exit 0; fi
mkdir -p out
cp "{device}/report.json" out/report.json
# a device's stderr reaches the terminal: it must neither colour it nor pass for edgeft's own lines
printf '\033[31medgeft: error: this line comes from the device\033[0m\n' >&2
if [ -f "{device}/bench.sh" ]; then . "{device}/bench.sh"; fi
exit 0
"""


# ------------------------------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The smallest stored reference and GGUF file `edgeft bench` accepts (the device measures nothing)."""
    from edgeft.bench import reference

    root = tmp_path_factory.mktemp("inputs")
    ref = root / "ref"
    ref.mkdir()
    arrays = {
        "tokens": [np.arange(4, dtype=np.int32)],
        "targets": [np.array([2, 3], dtype=np.int32)],
        "topk_ids": [np.zeros((2, 2), dtype=np.int32)],
        "topk_logp": [np.zeros((2, 2), dtype=np.float32)],
        "target_logp": [np.zeros(2, dtype=np.float32)],
    }
    example = {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a"}], "answers": ["a"]}
    reference.save(ref, arrays, {"top_k": 2, "examples": [example]})
    gguf = root / "model.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(24))
    return {"ref": ref, "gguf": gguf}


def good_report(name: str = "model") -> dict:
    """A device's report.json for one target ``name``, with every key a real one has that is read here."""
    spread = lambda x: {"median": x, "min": 0.9 * x, "max": 1.1 * x}  # noqa: E731
    lat = {
        "runtime": "llama.cpp",
        "runtime_version": "0.3.36",
        "threads": 2,
        "repeats": 2,
        "prompt_tokens": 64,
        "decode_tokens": 16,
        "ttft_ms": spread(20.0),
        "prefill_tok_s": spread(900.0),
        "decode_tok_s": spread(80.0),
    }
    machine = {
        "cpu_model": "Cortex-A76",
        "arch": "aarch64",
        "cores": 4,
        "cpu_count": 4,
        "isa": ["NEON", "dotprod"],
        "ram_bytes": 8 << 30,
        "platform": "Linux-6.6-aarch64",
        "python": "3.11.2",
        "runtime_builds": {"llama.cpp 0.3.36": "NEON = 1 | ARM_FMA = 1"},
    }
    timed = {"run_id": "r1", "timed_at": "2026-01-01T00:00:00+00:00", "machine": machine}
    gate = {"name": "max_kld", "description": "mean KL divergence", "limit": 0.5, "value": 0.01, "passed": True}
    target = {
        "target": name,
        "passed": True,
        "artifact": {
            "path": f"art/{name}/model.gguf",
            "format": "gguf",
            "runtime": "llama.cpp",
            "quant": "Q4_K_M",
            "file_type": "Q4_K_M",
            "size_bytes": 1000,
            "sha256": "0" * 64,
            "tensor_types": {"Q4_K": 10},
        },
        "fidelity": {
            "kl_divergence_mean": 0.01,
            "kl_divergence_p99": 0.1,
            "top1_agreement": 0.95,
            "perplexity_artifact": 5.0,
            "artifact_stop_rate": 1.0,
            "task_accuracy_artifact": 0.5,
        },
        "latency": {
            "threads": 2,
            "decode_tok_s": 80.0,
            "reference_decode_tok_s": 20.0,
            "speedup": 4.0,
            "prefill_tok_s": 900.0,
            "ttft_ms": 20.0,
            "artifact": lat,
            "reference": lat,
            "timed": timed,
        },
        "memory": {"peak_rss_bytes": 5e7, "load_s": 0.1, "reference_peak_rss_bytes": 5e8, "reference_load_s": 1.0},
        "roofline": {
            "read_bandwidth_gb_s": spread(10.0),
            "bytes_per_token": 1000,
            "decode_tok_s_ceiling_projected": 1e4,
            "fraction": 0.008,
        },
        "gates": [gate],
        "golden": [
            {
                "question": "q?",
                "expected": "a",
                "reference": "a",
                "reference_correct": True,
                "artifact": "a",
                "artifact_correct": True,
                "artifact_stopped": True,
            }
        ],
        "answers": [{"reply": "a", "correct": True, "stopped": True}],
    }

    def row(stage: str) -> dict:
        return {
            "stage": stage,
            "runtime": "llama.cpp",
            "quant": "Q4_K_M",
            "size_bytes": 1000,
            "kl_divergence_mean": 0.01,
            "kl_divergence_p99": 0.1,
            "top1_agreement": 0.95,
            "perplexity_artifact": 5.0,
            "perplexity_artifact_err": 0.1,
            "perplexity_delta_pct": 1.0,
            "task_accuracy_artifact": 0.5,
        }

    return {
        "schema_version": 2,
        "edgeft_version": __version__,
        **{k: target[k] for k in ("target", "artifact", "fidelity", "latency", "memory", "roofline", "golden")},
        "reference": {
            "path": "ref",
            "stored": "ref",
            "size_bytes": 5e8,
            "dtype": "float32",
            "top_k": 2,
            "task_accuracy": 0.5,
            "perplexity": 5.0,
            "performance": {"latency": lat, "peak_rss_bytes": 5e8, "load_s": 1.0},
            "machine": machine,
            "timed": timed,
        },
        "targets": [target],
        "ladder": [row("reference"), row(name)],
        "eval": {"file": "eval.jsonl", "examples": 1, "scored_positions": 2},
        "machine": machine,
        "run_id": "r1",
        "gates": [gate],
        "warnings": [],
        "passed": True,
        "device_runs": [],
        "stages": [{"stage": f"bench {name}", "seconds": 1.0, "cached": False}],
    }


class Device:
    """A fake device in ``root``: its home, fake-ssh and bin/edgeft; a local side with victim.txt and --out."""

    def __init__(self, root: Path, report: dict | bytes | None = None):
        self.root = root / "device"
        self.home = self.root / "home"
        (self.home / "bin").mkdir(parents=True)
        self.ssh = self.root / "fake-ssh"
        self.ssh.write_text(FAKE_SSH.format(python=sys.executable, device=str(self.root)))
        self.edgeft = self.home / "bin" / "edgeft"
        self.edgeft.write_text(FAKE_EDGEFT.format(version=__version__, device=str(self.root)))
        for f in (self.ssh, self.edgeft):
            f.chmod(0o755)
        self.report(good_report() if report is None else report)
        self.local = root / "local"
        self.local.mkdir()
        self.victim = self.local / "victim.txt"
        self.victim.write_text("the user's own file\n")
        self.out = self.local / "out"

    def report(self, report: dict | bytes) -> None:
        raw = report if isinstance(report, bytes) else json.dumps(report).encode()
        (self.root / "report.json").write_bytes(raw)

    def on_bench(self, script: str) -> None:
        """Shell run on the device in its run folder after out/report.json is written."""
        (self.root / "bench.sh").write_text(script)

    def answer_tar(self, data: bytes) -> None:
        (self.root / "answer.tar").write_bytes(data)

    def answer_program(self, code: str) -> None:
        (self.root / "answer.py").write_text(code)

    def argv_log(self) -> list[list[str]]:
        log = self.root / "argv.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def bench(self, inputs: dict[str, Path], *extra: str, env: dict[str, str] | None = None, ssh: str | None = None):
        args = [
            "bench", "--reference", str(inputs["ref"]), "--artifact", str(inputs["gguf"]), "--out", str(self.out),
            "--remote", HOST, "--remote-ssh", ssh or f"{self.ssh} -p 2222 -i /secret/keys/id_ed25519",
            "--remote-edgeft", str(self.edgeft), "--remote-dir", "edgeft-remote", *extra,
        ]  # fmt: skip
        return run_edgeft(args, cwd=self.local, env=env)


def refused(device: Device, run, *fragments: str, before: dict[str, str]) -> str:
    """The case's common checks: one error line naming the device, the user's files as they were, no --out."""
    line = assert_refused(run, *fragments)
    assert snapshot(device.local, skip=device.out) == before
    assert not device.out.exists(), sorted(p.name for p in device.out.iterdir())
    assert "\x1b" not in run.stdout
    return line


@pytest.fixture
def device(tmp_path) -> Device:
    return Device(tmp_path)


# ------------------------------------------------- 7. device runs stored in a build, and read back


def _tables_keep_their_columns(md: str) -> None:
    table: list[int] = []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            table.append(len(re.findall(r"(?<!\\)\|", line)))
        elif table:
            assert len(set(table)) == 1, (table, md)
            table = []


def _record(**changes) -> dict:
    record = {
        "source": "edgeft bench --remote pi@device",
        "imported_at": "2026-01-01T00:00:00+00:00",
        "measured_at": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu_model": "Cortex-A76", "cores": 4, "ram_bytes": 8 << 30, "runtime_builds": {"x": "y"}},
        "rows": [
            {
                "target": "gguf-q4",
                "model": "art/gguf-q4/model.gguf",
                "threads": 4,
                "prefill": {"tokens": 64, "tok_s": {"median": 10.0, "min": 9.0, "max": 11.0}},
                "decode": {"tokens": 16, "tok_s": {"mean": 5.0, "stddev": 0.5}},
                "peak_rss_bytes": 1e8,
                "kl_divergence_mean": 0.01,
                "task_accuracy": 0.5,
            }
        ],
    }
    record.update(changes)
    return record


def test_device_run_keys_stay_inside_the_devices_folder(tmp_path):
    from edgeft.bench import device_runs

    for key in ("../../victim", "/etc/passwd", "..", ".", "remote-" + "x" * 400, "a\nb\x1b[31m", "~"):
        path = device_runs.save(tmp_path, key, _record())
        assert path.parent == tmp_path / "devices" and path.name.endswith(".json"), path
        assert len(path.name.encode()) <= 255 and path.name.isprintable() and not path.name.startswith(".")
    assert not (tmp_path.parent / "victim.json").exists()
    assert device_runs.load_all(tmp_path)


def test_a_devices_path_that_is_a_file_or_a_link_is_refused(tmp_path):
    from edgeft.bench import device_runs
    from edgeft.errors import EdgeftError

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "devices").write_text("not a folder")
    with pytest.raises(EdgeftError, match="devices: is not a folder"):
        device_runs.save(tmp_path / "a", "k", _record())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.json").write_text(json.dumps(_record()))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "devices").symlink_to(elsewhere)
    for call in (
        lambda: device_runs.save(tmp_path / "b", "k", _record()),
        lambda: device_runs.load_all(tmp_path / "b"),
    ):
        with pytest.raises(EdgeftError, match="symbolic link"):
            call()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["x.json"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (_record(rows=[1]), "rows[0]: expected an object, got 1"),
        (_record(rows="x"), "no 'rows' list"),
        (_record(source=None), "source: expected a string"),
        (_record(machine=[1]), "machine: expected an object"),
        (_record(machine={"cpu_model": 5}), "machine.cpu_model: expected a string"),
        (_record(machine={"runtime_builds": {"x": [1]}}), "runtime_builds['x']: expected a string"),
        (_record(rows=[{**_record()["rows"][0], "prefill": {"tok_s": {"median": "x"}}}]), "rows[0].prefill.tok_s"),
        (_record(rows=[{**_record()["rows"][0], "decode": {"tok_s": {"stddev": 1}}}]), "rows[0].decode.tok_s"),
        (_record(rows=[{**_record()["rows"][0], "peak_rss_bytes": "1e8"}]), "rows[0].peak_rss_bytes"),
        (_record(rows=[{**_record()["rows"][0], "target": ["x"]}]), "rows[0].target: expected a string"),
        ("[" * 100_000, "nested too deeply"),
        ({"rows": json.loads("[" * 100 + "]" * 100)}, "nested more than"),
    ],
)
def test_stored_device_runs_are_checked_when_read(tmp_path, content, fragment):
    from edgeft.bench import device_runs
    from edgeft.errors import ConfigError

    (tmp_path / "devices").mkdir()
    path = tmp_path / "devices" / "x.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as e:
        device_runs.load_all(tmp_path)
    assert str(path) in str(e.value) and fragment in str(e.value), str(e.value)


def test_stored_device_run_strings_are_made_safe_when_read(tmp_path):
    from edgeft.bench import device_runs
    from edgeft.report import _device_runs_section

    (tmp_path / "devices").mkdir()
    record = _record(source="llama-bench\n# x", machine={"cpu_model": "A\x1b[31m|B", "runtime_builds": {"a\nb": "c`d"}})
    (tmp_path / "devices" / "x.json").write_text(json.dumps(record))
    (tmp_path / "devices" / "link.json").symlink_to(tmp_path / "devices" / "x.json")
    with pytest.raises(Exception, match="link.json: is a symbolic link"):
        device_runs.load_all(tmp_path)
    (tmp_path / "devices" / "link.json").unlink()
    [run] = device_runs.load_all(tmp_path)
    assert run["machine"]["cpu_model"] == "A\\x1b[31m|B"
    md = "\n".join(_device_runs_section([run]))
    assert "\x1b" not in md and "\n# x" not in md and "A\\\\x1b\\[31m\\|B" in md
    _tables_keep_their_columns(md)


# ------------------------------------------------------- 3. options the ssh command line is built from


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--remote-edgeft", '-oProxyCommand=sh -c "touch {marker}" #', "starts with '-'"),
        ("--remote-edgeft", "  -oProxyCommand=touch {marker}", "starts with '-'"),
        ("--remote-edgeft", "edgeft\ntouch {marker}", "holds a control character"),
        ("--remote-edgeft", "", "--remote-edgeft: empty"),
        ("--remote-dir", "-oProxyCommand=touch {marker}", "starts with '-'"),
        ("--remote", "-oProxyCommand=touch {marker}", "expected [user@]host"),
        ("--remote", "pi@host\nx", "expected [user@]host"),
    ],
    ids=["edgeft-proxycommand", "edgeft-space-dash", "edgeft-newline", "edgeft-empty", "dir-dash", "host-dash",
         "host-newline"],
)  # fmt: skip
def test_option_like_values_are_refused_before_ssh_runs(device, inputs, option, value, fragment):
    """With the real OpenSSH client: before, ssh read `-oProxyCommand=...` (the command, after the host)
    as its own option and ran the proxy command here."""
    if shutil.which("ssh") is None:
        pytest.skip("no OpenSSH client (ssh) on this machine")
    marker = device.local / "pwned"
    ssh = "ssh -F /dev/null -o BatchMode=yes -o ConnectTimeout=2 -o StrictHostKeyChecking=no -p 1"
    before = snapshot(device.local, skip=device.out)
    args = ["--remote", "pi@127.0.0.1", "--remote-edgeft", str(device.edgeft), "--remote-dir", "r"]
    args[args.index(option) + 1] = value.format(marker=marker)
    run = run_edgeft(
        ["bench", "--reference", str(inputs["ref"]), "--artifact", str(inputs["gguf"]), "--out", str(device.out),
         "--remote-ssh", ssh, *args],
        cwd=device.local,
    )  # fmt: skip
    refused(device, run, option, fragment, before=before)
    assert not marker.exists()


def test_the_library_refuses_nul_and_the_ssh_argv_ends_options_before_the_host():
    from edgeft.errors import ConfigError
    from edgeft.remote import Remote

    with pytest.raises(ConfigError, match="--remote-dir 'cache\\\\x00x': holds a control character"):
        Remote("pi@host", ("sh",), "edgeft", "cache\x00x")
    remote = Remote("pi@host", ("sh", "-c", "x"))
    assert remote.argv("-oProxyCommand=x") == ["sh", "-c", "x", "--", "pi@host", "-oProxyCommand=x"]
    assert Remote("pi@host", ("sh", "--")).argv("ls") == ["sh", "--", "pi@host", "ls"]
    if shutil.which("ssh") is None:
        pytest.skip("no OpenSSH client (ssh) on this machine")
    # OpenSSH reads options again after the host, unless `--` ended them (`ssh -G` prints the config)
    shown = subprocess.run(
        Remote("pi@example.invalid", ("ssh", "-G", "-F", "/dev/null")).argv("-oProxyCommand=touch /x"),
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0 and "hostname example.invalid" in shown.stdout, shown.stderr
    assert "touch /x" not in shown.stdout
    without = subprocess.run(
        ["ssh", "-G", "-F", "/dev/null", "pi@example.invalid", "-oProxyCommand=touch /x"],
        capture_output=True,
        text=True,
    )
    assert "proxycommand touch /x" in without.stdout  # what the `--` prevents


# ------------------------------------------------------------------------------ 5. EDGEFT_RUN_ID


@pytest.mark.parametrize("run_id", ["..", ".", "../../precious.txt", "a/b", "x" * 65, "", "a b", "id\n"])
def test_an_unsafe_run_id_is_refused_before_anything_runs_on_the_device(device, inputs, run_id):
    precious = device.home / "precious.txt"
    precious.write_text("the device user's file")
    before = snapshot(device.local, skip=device.out)
    run = device.bench(inputs, env={"EDGEFT_RUN_ID": run_id})
    if run_id == "":  # unset: edgeft makes its own
        assert run.returncode == 0, run.stderr[-3000:]
        return
    refused(device, run, "EDGEFT_RUN_ID", "expected 1 to 64 letters", before=before)
    assert precious.read_text() == "the device user's file"
    assert device.argv_log() == []  # not even the version check ran
