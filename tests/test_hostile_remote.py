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
left at --out; the huge streams also within a peak-RSS bound. No model is needed: the device never
measures anything, so the reference and the GGUF file are the smallest the local checks accept.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgeft import __version__

from .cli import run_edgeft
from .hostile import assert_refused, snapshot

HOST = "pi@device"
RSS_BOUND = 250e6  # measured: 60 to 130 MB, the test process's own RSS at fork included

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


@pytest.mark.slow
def test_a_well_behaved_device_report_comes_back(device, inputs):
    run = device.bench(inputs)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((device.out / "report.json").read_text())
    assert report["remote"]["host"] == HOST and report["targets"][0]["target"] == "model"
    for name in ("report.md", "junit.xml"):
        assert (device.out / name).stat().st_size > 0
    # every ssh call ends its options with `--` before the destination
    calls = device.argv_log()
    assert calls and all(args[args.index("--") + 1] == HOST for args in calls)
    # the device's stderr was shown, marked as the device's and without its escape sequences
    assert "remote: \\x1b[31medgeft: error: this line comes from the device" in run.stderr
    assert "\x1b" not in run.stderr + run.stdout
    assert not any(line.startswith("edgeft: error:") for line in run.stderr.splitlines())


def test_the_report_keeps_the_ssh_program_name_only(device, inputs):
    run = device.bench(inputs)
    assert run.returncode == 0, run.stderr[-3000:]
    text = (device.out / "report.json").read_text()
    assert json.loads(text)["remote"]["ssh"] == "fake-ssh"
    assert "/secret/keys" not in text and "/secret/keys" not in (device.out / "report.md").read_text()


# ------------------------------------------------------------------- 1. what the device's tar holds


@pytest.mark.parametrize(
    ("script", "fragment"),
    [
        # the case: a link at a fixed temp name, pointing beside --out once moved up a level
        ("ln -s ../victim.txt out/.report.md.tmp", "'out/.report.md.tmp', a symbolic link"),
        # a chain: l1 -> .. is inside the scratch folder until its children move up one level
        ("ln -s .. out/l1 && ln -s l1/victim.txt out/report.md", "'out/l1', a symbolic link"),
        ("ln -s /etc/passwd out/report.png", "'out/report.png', a symbolic link (to '/etc/passwd')"),
        ("mkdir out/bench-model && ln -s ../.. out/bench-model/up", "a symbolic link"),
        ("echo x > out/a && ln out/a out/b", "a hard link"),
        ("mkfifo out/fifo", "'out/fifo', a fifo"),
    ],
    ids=["tmp-name-link", "link-chain", "absolute-link", "nested-link", "hard-link", "fifo"],
)
def test_links_and_special_files_from_the_device_refuse_the_whole_folder(device, inputs, script, fragment):
    device.on_bench(script)
    before = snapshot(device.local, skip=device.out)
    run = device.bench(inputs)
    refused(device, run, f"--remote {HOST}: the report folder from the device holds", fragment, before=before)
    assert device.victim.read_text() == "the user's own file\n"


def _tar(*members: tuple[tarfile.TarInfo, bytes | None], report: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        if report:
            data = json.dumps(good_report()).encode()
            info = tarfile.TarInfo("out/report.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buf.getvalue()


def _pax_tar(headers: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("out/report.json")
        info.size, info.pax_headers = 2, headers
        tar.addfile(info, io.BytesIO(b"{}"))
    return buf.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = b"x", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data or b"")
    else:
        data = None
    return info, data


@pytest.mark.parametrize(
    ("tar", "fragment"),
    [
        (_tar(_entry("/tmp/edgeft-hostile-abs")), "'/tmp/edgeft-hostile-abs', a path outside out/"),
        (_tar(_entry("out/../victim.txt")), "'out/../victim.txt', a path outside out/"),
        (_tar(_entry("../victim.txt")), "a path outside out/"),
        (_tar(_entry("etc/passwd")), "'etc/passwd', a path outside out/"),
        (_tar(_entry("out/\x1b[31mred")), "name has control characters ('out/\\x1b[31mred')"),
        (_tar(_entry("out/two\nlines")), "control characters"),
        (_tar(_entry("out/dev", tarfile.CHRTYPE)), "'out/dev', a device file"),
        (_tar(_entry("out/blk", tarfile.BLKTYPE)), "a device file"),
        (_tar(_entry("out/h", tarfile.LNKTYPE, link="out/report.json")), "'out/h', a hard link"),
        (_tar(_entry("out/report.md", tarfile.SYMTYPE, link="/etc/passwd")), "a symbolic link (to '/etc/passwd')"),
        (_tar(_entry("out/report.json", data=b"{}")), "holds 'out/report.json' twice"),
        (_tar(_entry("out/x", b"V")), "an entry of type b'V'"),
        (_tar(report=False), "wrote no out/report.json"),
        (_tar(_entry("out/report.json", tarfile.DIRTYPE), report=False), "wrote no out/report.json"),
        (b"this is not a tar file at all" * 40, "not a valid tar"),
        (_pax_tar({"GNU.sparse.map": "1,a"}), "not a valid tar (invalid literal"),  # tarfile: ValueError
        (_pax_tar({"path": "out/\udcff"}), "name has control characters ('out/\\udcff')"),
        (b"", "not a valid tar (empty file)"),
    ],
    ids=[
        "absolute", "dotdot-inside", "dotdot", "outside-out", "escape-in-name", "newline-in-name", "chardev",
        "blockdev", "hardlink", "symlink", "duplicate", "unknown-type", "no-report", "report-is-a-folder",
        "garbage", "bad-sparse-map", "undecodable-name", "empty",
    ],
)  # fmt: skip
def test_crafted_tars_are_refused_whole(device, inputs, tar, fragment):
    device.answer_tar(tar)
    before = snapshot(device.local, skip=device.out)
    refused(device, device.bench(inputs), f"--remote {HOST}:", fragment, before=before)
    assert not Path("/tmp/edgeft-hostile-abs").exists()


# A tar stream made as it is sent: a header for `out/report.json`, then what the case streams.
_STREAM = r"""
import io, json, sys, tarfile
out = sys.stdout.buffer
def header(name, size, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.GNU_FORMAT)
report = b"{{}}"
out.write(header("out/report.json", len(report)) + report + bytes(512 - len(report)))
{body}
"""


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        # regular files of names the report folder does not use: skipped unread, but counted
        (
            "block = bytes(1 << 20)\nfor i in range(1 << 12):\n"
            "    out.write(header(f'out/junk-{i}', len(block)) + block)",
            "the device's report folder sent more than 64 MB",
        ),
        # one file announced at 10 GB: refused on its header
        ("out.write(header('out/report.json.x', 10 << 30))\nout.write(bytes(1 << 20))", "of 10737418240 bytes"),
        ("out.write(header('out/report.png', 100 << 20))", "'out/report.png' of 104857600 bytes; at most 16 MB"),
        # a pax header announced at 1 GB (tarfile would hold it whole in memory), then an endless stream
        (
            "out.write(header('out/pax', 1 << 30, tarfile.XHDTYPE))\nblock = bytes(1 << 20)\n"
            "while True:\n    out.write(block)",
            "sent more than 64 MB",
        ),
        # the end-of-archive marker, then endless zeros
        ("block = bytes(1 << 20)\nwhile True:\n    out.write(block)", "sent more than 64 MB"),
        ("for i in range(5000):\n    out.write(header(f'out/e{i}', 0))", "more than 1000 entries"),
    ],
    ids=["many-large-files", "huge-entry", "huge-plot", "huge-pax-header", "endless-zeros", "many-entries"],
)
def test_huge_streams_are_cut_off_within_bounded_memory(device, inputs, body, fragment):
    device.answer_program(_STREAM.format(body=body))
    before = snapshot(device.local, skip=device.out)
    run = device.bench(inputs)
    refused(device, run, f"--remote {HOST}:", fragment, before=before)
    assert run.peak_rss_bytes < RSS_BOUND, run.peak_rss_bytes


def _bomb(size: int) -> bytes:
    """A report.json of about ``size`` bytes, nearly all of it two-letter strings: ~20 times its size
    in memory once decoded."""
    raw = json.dumps(good_report())
    filler = ",".join(['"ab"'] * ((size - len(raw)) // 5))
    return raw.replace('"warnings": []', f'"warnings": [{filler}]', 1).encode()


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (lambda: _bomb(17 << 20), "holds 'out/report.json' of 178"),
        (lambda: _bomb(15 << 20), "report.json holds more than 1000000 values"),
        (lambda: _bomb(2 << 20), "report.json: warnings: 4"),
    ],
    ids=["over-16-MB", "15-MB-of-strings", "many-warnings"],
)
def test_large_reports_are_refused_within_bounded_memory(device, inputs, raw, fragment):
    device.report(raw())
    before = snapshot(device.local, skip=device.out)
    run = device.bench(inputs)
    refused(device, run, f"--remote {HOST}:", fragment, before=before)
    assert run.peak_rss_bytes < RSS_BOUND, run.peak_rss_bytes


# ------------------------------------------------------------------------------ 4. the report itself


def _nested(depth: int) -> bytes:
    report = good_report()
    report["reference"]["extra"] = "DEEP"  # spliced in as text: decoding it here would hit the recursion limit
    return json.dumps(report).replace('"DEEP"', "[" * depth + "]" * depth).encode()


def _changed(path: str, value) -> bytes:
    report = good_report()
    keys = path.split(".")
    at = report
    for k in keys[:-1]:
        at = at[int(k)] if isinstance(at, list) else at[k]
    if value is KeyError:
        del at[keys[-1]]
    else:
        at[keys[-1]] = value
    return json.dumps(report).encode()


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"not json", "report.json is not JSON (Expecting value"),
        (b"\xff\xfe\x00garbage", "report.json is not JSON"),
        (b'{"a": ' + b"1" * 5000 + b"}", "report.json is not JSON"),
        (b"[]", "report.json is not a JSON object (it holds a list)"),
        (b'"a string"', "is not a JSON object"),
        (_changed("reference", KeyError), "report.json: reference: missing"),
        (_changed("targets", KeyError), "report.json: targets: missing"),
        (_changed("targets", "x"), "targets: expected a list, got 'x'"),
        (_changed("targets", []), "targets: empty"),
        (_changed("targets.0.latency.artifact.decode_tok_s.median", "fast"), "decode_tok_s.median: expected a number"),
        (_changed("targets.0.passed", None), "targets[0].passed: expected true or false, got None"),
        (_changed("machine", [1]), "machine: expected an object, got a list"),
        (_changed("warnings", "one"), "warnings: expected a list"),
        (_changed("targets.0.gates.0.value", "big"), "targets[0].gates[0].value: expected a number"),
        (_changed("targets.0.target", "other"), "target 'other' was not sent; expected model"),
        (_changed("ladder.1.stage", "[/bold]"), "ladder stage '[/bold]' is neither the reference nor a target"),
        (_changed("reference.timed", 5), "reference.timed: expected an object"),
        (b"[" * 200_000, "report.json is nested too deeply to read"),
        (_nested(5000), "nested too deeply to read"),
        (_nested(100), "report.json is nested more than 32 levels deep"),
        (b"[" + b"[]," * 300_000 + b"[]]", "holds more than 200000 lists and objects"),
    ],
    ids=[
        "not-json", "not-utf8", "huge-int", "list", "string", "no-reference", "no-targets", "targets-string",
        "targets-empty", "speed-string", "passed-null", "machine-list", "warnings-string", "gate-value", "other-target",
        "markup-stage", "timed-number", "200k-deep", "5k-deep", "100-deep", "many-containers",
    ],
)  # fmt: skip
def test_malformed_device_reports_are_refused_naming_the_place(device, inputs, raw, fragment):
    device.report(raw)
    before = snapshot(device.local, skip=device.out)
    line = refused(device, device.bench(inputs), f"--remote {HOST}: the device's report.json", fragment, before=before)
    assert len(line) < 400


# ------------------------------------------------------------------- 2. strings the device controls

HOSTILE = {
    "warning": "ok\n# Owned\n<img src=x onerror=alert(1)>",
    "clear": "\x1b[2J\x1b]0;pwned\x07cleared\r",
    "link": "a | b ` c [link](http://x) ![img](http://tracker.invalid/x.png) \\| d",
    "surrogate": "lone \ud800 half",
    "cpu": "Evil\x1b[31m CPU\r\nMachine: fake \u202eevil",
}


def hostile_report(name: str = "model") -> dict:
    r = good_report(name)
    r["warnings"] = [HOSTILE["warning"], HOSTILE["clear"], HOSTILE["link"], HOSTILE["surrogate"]]
    for machine in (r["machine"], r["reference"]["machine"], r["targets"][0]["latency"]["timed"]["machine"]):
        machine["cpu_model"] = HOSTILE["cpu"]
        machine["runtime_builds"] = {"llama.cpp\n## build": "NEON = 1`\n<script>x</script>"}
    r["reference"]["path"] = "ref`</code><script>"
    t = r["targets"][0]
    t["artifact"]["path"] = "a`b\nc"
    t["artifact"]["runtime"] = "llama.cpp | injected |"
    t["artifact"]["tensor_types"] = {"Q4_K\n# tensor": 10}
    t["latency"]["artifact"]["runtime_version"] = "0.3\x1b[0m | x"
    t["gates"][0]["description"] = "kld\n| fake | row |"
    t["golden"][0]["question"] = "q\n# golden <b>"
    r["ladder"][1]["runtime"] = "torch | x"
    return r


def _tables_keep_their_columns(md: str) -> None:
    table: list[int] = []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            table.append(len(re.findall(r"(?<!\\)\|", line)))
        elif table:
            assert len(set(table)) == 1, (table, md)
            table = []


def _assert_markdown_is_inert(md: str) -> None:
    assert "\x1b" not in md and "\r" not in md and "\u202e" not in md
    headings = [line for line in md.splitlines() if line.startswith("#")]
    assert not any("Owned" in h or "build" in h or "tensor" in h or "golden" in h for h in headings), headings
    # HTML outside code spans only with its '<' escaped; links and images never form
    assert "\\<img src=x" in md and "<img" not in md.replace("\\<img", "")
    assert "\\<b\\>" in md
    assert "\\[link\\](http://x)" in md and "!\\[img\\]" in md
    # untrusted text inside a code span: the fence is longer than any backtick run in it
    assert "``ref`</code><script>``" in md and "``NEON = 1`\\x0a<script>x</script>``" in md
    assert "``a`b\\x0ac``" in md
    _tables_keep_their_columns(md)


@pytest.mark.slow
def test_device_strings_are_inert_in_report_md_and_on_the_terminal(device, inputs):
    device.report(hostile_report())
    run = device.bench(inputs)
    assert run.returncode == 0, run.stderr[-3000:]
    terminal = run.stdout + run.stderr
    assert "\x1b" not in terminal and "\r" not in terminal and "\u202e" not in terminal
    assert not any(line.startswith(("# Owned", "Machine: fake", "<img")) for line in terminal.splitlines()), terminal
    assert "edgeft: warning: ok\\x0a# Owned\\x0a<img src=x onerror=alert(1)>" in run.stderr
    assert "edgeft: warning: lone \\ud800 half" in run.stderr
    _assert_markdown_is_inert((device.out / "report.md").read_text())
    stored = json.loads((device.out / "report.json").read_text())
    assert stored["warnings"][1] == "\\x1b[2J\\x1b]0;pwned\\x07cleared\\x0d"
    assert stored["machine"]["cpu_model"] == "Evil\\x1b[31m CPU\\x0d\\x0aMachine: fake \\u202eevil"


# ------------------------------------------------- 7. device runs stored in a build, and read back


def _fake_build(root: Path, inputs: dict[str, Path], name: str = "gguf-q4") -> Path:
    """A build folder as `edgeft bench --build` reads it: a reference, one quantized target, a report."""
    build = root / "build"
    (build / name).mkdir(parents=True)
    (build / "manifest.json").write_text(json.dumps({"stage": "build"}))
    (build / name / "manifest.json").write_text(json.dumps({"stage": "quantize"}))
    shutil.copy(inputs["gguf"], build / name / "model.gguf")
    shutil.copytree(inputs["ref"], build / "reference")
    (build / "report.json").write_text(json.dumps(good_report(name)))
    return build


@pytest.mark.slow
def test_a_device_run_folded_into_a_build_report_is_inert(device, inputs):
    build = _fake_build(device.local, inputs)
    device.report(hostile_report("gguf-q4"))
    run = run_edgeft(
        [
            "bench", "--build", str(build), "--target", "gguf-q4", "--out", str(device.out), "--remote", HOST,
            "--remote-ssh", str(device.ssh), "--remote-edgeft", str(device.edgeft), "--remote-dir", "r",
        ],
        cwd=device.local,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert [p.name for p in (build / "devices").iterdir()] == ["remote-pi-device.json"]
    md = (build / "report.md").read_text()
    assert "## Measured on other machines" in md
    section = md[md.index("## Measured on other machines") :]
    assert "\x1b" not in section
    # controls shown as escapes, markdown's own characters (a backslash too) escaped
    assert "Evil\\\\x1b\\[31m CPU\\\\x0d\\\\x0aMachine: fake \\\\u202eevil" in section
    assert "``NEON = 1`\\x0a<script>x</script>``" in section
    _tables_keep_their_columns(md)


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


@pytest.mark.parametrize(("content", "fragment"), [("[" * 100_000, "nested too deeply"), ("[1]", "not a JSON object")])
def test_a_build_report_that_cannot_take_device_runs_is_named(tmp_path, content, fragment):
    from edgeft.errors import ConfigError
    from edgeft.report import refold

    (tmp_path / "report.json").write_text(content)
    with pytest.raises(ConfigError, match=f"report.json: .*{fragment}"):
        refold(tmp_path)


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_fifo_or_a_link_left_in_out_by_an_earlier_run_is_not_written_through(device, inputs):
    """--out from an earlier bench, with links planted where reports are written: replaced, never followed."""
    assert device.bench(inputs).returncode == 0
    for name in ("report.md", "report.json", "junit.xml", "report.png"):
        (device.out / name).unlink()
        (device.out / name).symlink_to(device.victim)
    os.mkfifo(device.out / ".report.md.tmp")
    before = snapshot(device.local, skip=device.out)
    run = device.bench(inputs)
    assert run.returncode == 0, run.stderr[-3000:]
    assert snapshot(device.local, skip=device.out) == before
    for name in ("report.md", "report.json", "junit.xml"):
        assert stat.S_ISREG(os.lstat(device.out / name).st_mode)
