"""Bad input: one line naming the file/line/key, exit status 2, no traceback, nothing left behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .cli import run_edgeft

COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeft: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0]


def write_config(tmp_path: Path, model: str = "smollm2-135m", train: str | None = None, extra: str = "") -> Path:
    train = train or str(COOKING / "train.jsonl")
    cfg = tmp_path / "edgeft.toml"
    cfg.write_text(f'model = "{model}"\n[data]\ntrain = "{train}"\neval = "{COOKING / "eval.jsonl"}"\n{extra}')
    return cfg


def test_unknown_target_lists_valid_ones(tmp_path):
    proc = run_edgeft(["build", "--target", "gguf-q9", "--out", "out"], tmp_path)
    assert_user_error(proc, "unknown target 'gguf-q9'", "gguf-q4", "gguf-q8")
    assert not (tmp_path / "out").exists()


def test_unknown_config_key(tmp_path):
    cfg = write_config(tmp_path, extra="[train]\nepoch = 3\n")
    proc = run_edgeft(["build", "--config", str(cfg), "--out", "out"], tmp_path)
    assert_user_error(proc, str(cfg), "[train].epoch: unknown key", "epochs")
    assert not (tmp_path / "out").exists()


def test_malformed_dataset_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    lines = (COOKING / "train.jsonl").read_text().splitlines()[:5]
    lines[2] = lines[2][:-5]  # cut the closing braces off line 3
    bad.write_text("\n".join(lines) + "\n")
    proc = run_edgeft(["build", "--config", str(write_config(tmp_path, train=str(bad))), "--out", "out"], tmp_path)
    assert_user_error(proc, f"{bad}:3:", "invalid JSON")
    assert not (tmp_path / "out").exists()


def test_missing_model_folder(tmp_path):
    proc = run_edgeft(
        ["build", "--config", str(write_config(tmp_path, model="./no-such-model")), "--out", "out"], tmp_path
    )
    assert_user_error(proc, "no-such-model")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    model = tmp_path / "gpt2-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    proc = run_edgeft(["build", "--config", str(write_config(tmp_path, model=str(model))), "--out", "out"], tmp_path)
    assert_user_error(proc, str(model), "gpt2")
    assert not (tmp_path / "out").exists()


def test_train_with_bad_data_leaves_no_adapter(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    proc = run_edgeft(["train", "--data", str(bad), "--out", "adapter"], tmp_path)
    assert_user_error(proc, f"{bad}:1:", "assistant")
    assert not (tmp_path / "adapter").exists()


def test_bench_missing_artifact(tmp_path):
    proc = run_edgeft(
        ["bench", "--artifact", "nope.gguf", "--reference", "ref", "--eval", str(COOKING / "eval.jsonl")], tmp_path
    )
    assert_user_error(proc, "nope.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["targets"], ["build", "--dry-run", "--target", "gguf-q8"]])
def test_informational_commands(tmp_path, args):
    proc = run_edgeft(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    if args == ["targets"]:
        assert "gguf-q4" in proc.stdout and "Q4_K_M" in proc.stdout
