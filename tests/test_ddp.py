"""Two processes train one adapter with DDP on CPU (gloo), launched the way docs/training.md says."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .tiny import make_tiny_llama

pytestmark = pytest.mark.slow  # every test here builds or runs a model end to end

COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_adapter(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model = make_tiny_llama(tmp_path / "base", tokenizer)
    data = tmp_path / "train.jsonl"
    data.write_text("".join((COOKING / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
    cfg = tmp_path / "edgeft.toml"
    cfg.write_text(
        f'model = "{model}"\n[data]\ntrain = "{data}"\n'
        "[train]\nmax_steps = 4\nbatch_size = 4\nrank = 4\nthreads = 1\nsave_steps = 2\nlearning_rate = 1e-2\n"
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "edgeft", "train", "--config", str(cfg), "--out", str(out / "adapter")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]

    lines = sorted(ln for ln in proc.stdout.splitlines() if ln.startswith("adapter: "))
    assert lines == [
        f"adapter: {out / 'adapter'} (rank 0 of 2)",
        f"adapter: {out / 'adapter'} (rank 1 of 2: trained; rank 0 wrote it)",
    ]
    results = json.loads((out / "adapter" / "manifest.json").read_text())["results"]
    # 2 of the 16 conversations held out for validation (the default validation_share = 0.1)
    assert results["world_size"] == 2 and results["steps"] == 4 and results["examples"] == 14
    assert [e["step"] for e in results["eval_loss_history"]] == [1, 2, 3, 4]  # both ranks evaluated in step
    assert results["best_step"] == min(results["eval_loss_history"], key=lambda e: e["loss"])["step"]
    assert json.loads((out / "adapter" / "manifest.json").read_text())["params"]["world_size"] == 2
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k) > 0  # it trained
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]  # one adapter; no scratch, no checkpoints left
