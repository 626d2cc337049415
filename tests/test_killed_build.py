"""kill -9 a build in the middle of a stage, run it again: every final path is complete or absent,
the rerun finishes, reuses every stage that had finished, and leaves no scratch folder behind.

A tiny llama (real SmolLM2 tokenizer) keeps each build to tens of seconds; the stages, llama.cpp
and the probe subprocesses are the real ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .cli import start_edgeft
from .tiny import tiny_build_config

pytestmark = pytest.mark.slow  # every test here builds or runs a model end to end


@pytest.fixture(scope="module")
def config(tmp_path_factory, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("killed")
    # enough steps that training is still running when we look for its scratch folder
    cfg = tiny_build_config(
        root, tokenizer, "max_steps = 60\nbatch_size = 4\nmax_seq_len = 64\nrank = 4\n", train_rows=32
    )
    return cfg


def start(config: Path, out: Path, targets: str) -> subprocess.Popen:
    # start_edgeft gives it a process group of its own: the kill reaches the probe subprocesses too
    return start_edgeft(
        ["build", "--config", config, "--target", targets, "--out", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def kill_when(proc: subprocess.Popen, out: Path, scratch_prefix: str, timeout: float = 600) -> Path:
    """SIGKILL the build's process group as soon as ``out/<scratch_prefix>*`` exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(out.glob(scratch_prefix + "*")) if out.is_dir() else []
        if found:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"build ended (exit {proc.returncode}) before {scratch_prefix}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no {scratch_prefix} folder appeared in {timeout} s")


def finish(config: Path, out: Path, targets: str) -> dict[str, bool]:
    proc = start(config, out, targets)
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err.decode()[-3000:]
    return {s["stage"]: s["cached"] for s in json.loads((out / "report.json").read_text())["stages"]}


def scratch(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def test_killed_builds_resume_from_finished_stages(config, tmp_path):
    out = tmp_path / "build"

    # 1. killed while training: the adapter is absent, not half there
    proc = start(config, out, "gguf-q8")
    left = kill_when(proc, out, ".adapter.tmp-")
    assert left.is_dir() and not (out / "adapter").exists()

    stages = finish(config, out, "gguf-q8")
    assert stages["train"] is False  # nothing of the killed training is trusted
    assert scratch(out) == []
    assert (out / "adapter" / "manifest.json").is_file()

    # 2. a second target, killed while it is benchmarked
    proc = start(config, out, "gguf-q8,gguf-q4_0")
    left = kill_when(proc, out, ".bench-gguf-q4_0.tmp-")
    assert not (out / "bench-gguf-q4_0").exists()
    assert (out / "gguf-q4_0" / "manifest.json").is_file()  # quantize had finished: it stays

    stages = finish(config, out, "gguf-q8,gguf-q4_0")
    finished_before_the_kill = [
        "train",
        "merge",
        "reference",
        "bench-base",
        "export",
        "quantize gguf-q8",
        "quantize gguf-q4_0",
        "bench gguf-q8",
    ]
    assert {s: stages[s] for s in finished_before_the_kill} == dict.fromkeys(finished_before_the_kill, True)
    assert stages["bench gguf-q4_0"] is False
    assert scratch(out) == []
    report = json.loads((out / "report.json").read_text())
    assert [t["target"] for t in report["targets"]] == ["gguf-q8", "gguf-q4_0"]
    # every stage that ran records its own peak RSS beside the plan's estimate; cached ones have none
    ran = [s for s in report["stages"] if not s["cached"]]
    assert ran and all(s["peak_rss_bytes"] and s["peak_rss_bytes"] > 50e6 for s in ran), ran
    assert all(s["peak_rss_bytes"] is None for s in report["stages"] if s["cached"])
    assert {s["stage"]: s.get("estimated_peak_ram_bytes") for s in report["stages"]}["merge"] > 0
    # ... and the RSS it started from (what earlier stages left), at most its peak
    assert all(0 < s["start_rss_bytes"] <= s["peak_rss_bytes"] for s in ran), ran
    # ... and its peak anonymous memory (sampled), what the estimate counts
    assert all(s["peak_anon_bytes"] > 50e6 for s in ran) and all(
        s["peak_anon_bytes"] is None for s in report["stages"] if s["cached"]
    )
    assert "| RSS at start MB | peak RSS MB | peak anonymous MB | estimated MB |" in (out / "report.md").read_text()
