"""A training run killed mid-way resumes from its last checkpoint and ends with the same adapter.

Tiny llama, real SmolLM2 tokenizer, real Trainer checkpoints; the kill is a real SIGKILL of a
training subprocess (and, in-process, an exception raised by a TrainerCallback).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeft import checkpoints
from edgeft.config import TrainConfig

from .tiny import make_tiny_llama

COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"
# 16 examples, 4 per step: 4 steps an epoch; checkpoints at 3 and 6, so a kill after step 7 resumes
# from 6: in the second epoch, two batches in (both the epoch fast-forward and the batch skip count).
CFG = dict(max_steps=8, batch_size=4, learning_rate=1e-2, rank=4, alpha=8, seed=0, save_steps=3, threads=1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    data = root / "train.jsonl"
    data.write_text("".join((COOKING / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
    return make_tiny_llama(root / "base", tokenizer), data


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory) -> Path:
    from edgeft.train import train

    out = train(*inputs, tmp_path_factory.mktemp("straight") / "adapter", TrainConfig(**CFG))
    assert out.manifest["results"]["resumed_from_step"] == 0 and out.manifest["results"]["steps"] == 8
    return out.path


def assert_same_adapter(a: Path, b: Path) -> None:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-7, msg=k)
    assert any(float(v.abs().max()) > 0 for k, v in x.items() if "lora_B" in k)  # it trained


def interrupt_after(step: int):
    """A TrainerCallback that raises KeyboardInterrupt once step ``step`` ends (Ctrl-C, as it were)."""
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt(f"interrupted after step {step}")

    return Interrupt()


@pytest.mark.slow
def test_an_interrupted_run_resumes_and_ends_with_the_same_adapter(inputs, uninterrupted, tmp_path):
    from edgeft.train import train

    out = tmp_path / "adapter"
    with pytest.raises(KeyboardInterrupt):
        train(*inputs, out, TrainConfig(**CFG), callbacks=[interrupt_after(7)])
    assert not out.exists()
    [kept] = list(tmp_path.glob(".adapter.ckpt-*"))
    assert checkpoints.step_of(checkpoints.latest(kept)) == 6
    assert not list(tmp_path.glob(".adapter.tmp-*"))  # the stage's scratch went with the exception

    again = train(*inputs, out, TrainConfig(**CFG))
    assert again.manifest["results"]["resumed_from_step"] == 6 and again.manifest["results"]["steps"] == 8
    assert_same_adapter(again.path, uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # checkpoints removed once done


@pytest.mark.slow
def test_a_killed_training_process_resumes_where_it_stopped(inputs, uninterrupted, tmp_path):
    from edgeft.train import train

    out = tmp_path / "adapter"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from transformers import TrainerCallback
        from edgeft.config import TrainConfig
        from edgeft.train import train

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == 7:
                    os.kill(os.getpid(), signal.SIGKILL)

        train(Path({str(inputs[0])!r}), Path({str(inputs[1])!r}), Path({str(out)!r}), TrainConfig(**{CFG!r}),
              callbacks=[Kill()])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not out.exists()
    assert len(list(tmp_path.glob(".adapter.tmp-*"))) == 1  # a SIGKILL leaves the stage's scratch behind...

    again = train(*inputs, out, TrainConfig(**CFG))
    assert again.manifest["results"]["resumed_from_step"] == 6
    assert_same_adapter(again.path, uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # ...which the next run removes


def test_a_live_run_keeps_its_checkpoints_from_a_concurrent_one(tmp_path):
    final = tmp_path / "adapter"
    with checkpoints.resumable(final, "a" * 64) as mine:
        assert mine is not None and mine.is_dir()
        (mine / "checkpoint-3").mkdir()
        with checkpoints.resumable(final, "a" * 64) as theirs:
            assert theirs is None  # same stage, live writer: train without resuming, touch nothing
        with checkpoints.resumable(final, "b" * 64) as other:
            assert other is not None and other != mine  # another config does not sweep a live run's folder
        assert (mine / "checkpoint-3").is_dir()
    assert not mine.exists()  # finished: removed


def test_checkpoints_of_a_changed_config_are_removed_when_no_run_holds_them(tmp_path):
    final = tmp_path / "adapter"
    old = tmp_path / checkpoints.folder_name("adapter", "a" * 64)
    (old / "checkpoint-3").mkdir(parents=True)
    with checkpoints.resumable(final, "b" * 64) as mine:
        assert not old.exists() and mine.is_dir()


def test_a_checkpoint_killed_while_being_written_is_skipped(tmp_path):
    for step, files in ((3, checkpoints._NEEDED), (6, checkpoints._NEEDED[:-1])):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for f in files:
            (d / f).write_text('{"global_step": %d}' % step)
    assert checkpoints.latest(tmp_path) == tmp_path / "checkpoint-3"
    os.remove(tmp_path / "checkpoint-3" / "trainer_state.json")
    assert checkpoints.latest(tmp_path) is None


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_adapter_it_found_before_the_kill(inputs, tmp_path):
    """The best step (2) lies before the checkpoint the run resumes from (6): its weights must come back
    from the checkpoint folder, not from the resumed run's memory."""
    from edgeft.train import train

    from .test_validation import rising_validation

    validation = rising_validation(tmp_path / "validation.jsonl")
    cfg = TrainConfig(**{**CFG, "eval_steps": 2})
    straight = train(*inputs, tmp_path / "straight" / "adapter", cfg, validation_file=validation)
    assert straight.manifest["results"]["best_step"] == 2

    out = tmp_path / "resumed" / "adapter"
    with pytest.raises(KeyboardInterrupt):
        train(*inputs, out, cfg, callbacks=[interrupt_after(7)], validation_file=validation)
    [kept] = list(out.parent.glob(".adapter.ckpt-*"))
    assert sorted(p.name for p in kept.glob("best-*")) == ["best-2.safetensors"]

    again = train(*inputs, out, cfg, validation_file=validation)
    r = again.manifest["results"]
    assert r["resumed_from_step"] == 6 and r["best_step"] == 2 and r["final_is_best"] is False
    assert r["eval_loss_history"] == straight.manifest["results"]["eval_loss_history"]
    assert_same_adapter(again.path, straight.path)
