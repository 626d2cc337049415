"""Validation loss during training: the held-out split, the histories, and the adapter kept for it.

Tiny llama, real SmolLM2 tokenizer. The validation set below is built so that its loss rises once
training is under way (replies in a made-up code that cooking answers pull probability away from),
so the best step is not the last one and picking it is visible.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeft.config import TrainConfig
from edgeft.data import load_jsonl
from edgeft.errors import ConfigError
from edgeft.validation import best_of, eval_every, split_validation

from .tiny import make_tiny_llama

COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"
CFG = dict(
    max_steps=8, batch_size=4, learning_rate=1e-2, rank=4, alpha=8, seed=0, save_steps=3, threads=1, eval_steps=2
)


def rising_validation(path: Path) -> Path:
    """Four conversations whose replies no cooking answer resembles: their loss goes up with training."""
    reply = " ".join(["ZQXJ VKWP"] * 12)
    lines = [
        {"messages": [{"role": "user", "content": f"Say the code {i}."}, {"role": "assistant", "content": reply}]}
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("validation")
    data = root / "train.jsonl"
    data.write_text("".join((COOKING / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
    return make_tiny_llama(root / "base", tokenizer), data, rising_validation(root / "validation.jsonl")


def lora_snapshots():
    """A TrainerCallback that copies the LoRA weights at every evaluation, by step."""
    from peft import get_peft_model_state_dict
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def __init__(self) -> None:
            self.by_step: dict[int, dict] = {}

        def on_evaluate(self, args, state, control, model=None, **kwargs):
            weights = get_peft_model_state_dict(model)
            self.by_step[state.global_step] = {k: v.detach().clone() for k, v in weights.items()}

    return Snapshots()


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_adapter_written_is_the_one_with_the_lowest_validation_loss(inputs, tmp_path):
    from edgeft.train import train

    model, data, validation = inputs
    snaps = lora_snapshots()
    out = train(model, data, tmp_path / "adapter", TrainConfig(**CFG), callbacks=[snaps], validation_file=validation)
    r = out.manifest["results"]

    assert [e["step"] for e in r["eval_loss_history"]] == [2, 4, 6, 8]  # every eval_steps, and the last step
    best = min(r["eval_loss_history"], key=lambda e: e["loss"])
    assert (r["best_step"], r["best_eval_loss"]) == (best["step"], best["loss"])
    assert r["best_step"] < 8 and r["final_is_best"] is False  # the set is built so the loss rises
    written = adapter_weights(out.path)
    assert same(written, snaps.by_step[r["best_step"]])
    assert not same(written, snaps.by_step[8])
    assert r["validation"] == {"source": str(validation), "examples": 4}
    assert r["examples"] == 16  # a validation file leaves every training conversation to training
    steps = [e["step"] for e in r["train_loss_history"]]
    assert steps == sorted(steps) and steps[-1] == 8 and len(steps) == 8


@pytest.mark.slow
def test_a_share_of_the_training_data_is_held_out_when_no_file_is_given(inputs, tmp_path):
    from edgeft.train import train

    model, data, _ = inputs
    cfg = TrainConfig(**{**CFG, "validation_share": 0.25, "eval_steps": 0})
    r = train(model, data, tmp_path / "adapter", cfg).manifest["results"]
    assert r["examples"] == 12 and r["validation"] == {"source": "held out of the training data", "examples": 4}
    assert r["eval_steps"] == 1  # 0: about ten evaluations over 8 steps
    assert [e["step"] for e in r["eval_loss_history"]] == list(range(1, 9))
    assert r["best_step"] == best_of(r["eval_loss_history"])["step"]


def test_without_validation_the_last_adapter_is_kept_and_nothing_is_evaluated(inputs, tmp_path):
    from edgeft.train import train

    model, data, _ = inputs
    r = train(model, data, tmp_path / "adapter", TrainConfig(**{**CFG, "validation_share": 0, "eval_steps": 0}))
    res = r.manifest["results"]
    assert res["eval_loss_history"] == [] and res["best_step"] is None and res["final_is_best"] is None
    assert res["validation"] is None and res["examples"] == 16


@pytest.mark.slow
def test_what_picks_the_kept_checkpoint_is_part_of_the_stage_key(inputs, tmp_path):
    from edgeft.train import train

    model, data, validation = inputs
    out = tmp_path / "adapter"
    train(model, data, out, TrainConfig(**CFG), validation_file=validation)
    assert train(model, data, out, TrainConfig(**{**CFG, "threads": 2}), validation_file=validation).cached
    assert not train(model, data, out, TrainConfig(**{**CFG, "eval_steps": 4}), validation_file=validation).cached
    assert not train(model, data, out, TrainConfig(**{**CFG, "eval_steps": 4})).cached  # held-out share instead
    assert not train(model, data, out, TrainConfig(**{**CFG, "eval_steps": 4, "validation_share": 0.2})).cached


def test_the_held_out_split_depends_on_the_seed_alone():
    examples = load_jsonl(COOKING / "train.jsonl")
    train_a, val_a = split_validation(examples, 0.1, seed=0)
    train_b, val_b = split_validation(list(examples), 0.1, seed=0)
    assert val_a == val_b and train_a == train_b
    assert len(val_a) == round(0.1 * len(examples)) and len(train_a) + len(val_a) == len(examples)
    assert not [ex for ex in val_a if ex in train_a]
    assert [ex for ex in examples if ex in train_a] == train_a  # training keeps the file order
    assert split_validation(examples, 0.1, seed=1)[1] != val_a


def test_a_share_that_leaves_nothing_to_train_on_is_refused():
    examples = load_jsonl(COOKING / "train.jsonl")[:2]
    assert len(split_validation(examples, 0.01, 0)[1]) == 1  # at least one conversation is held out
    with pytest.raises(ConfigError, match=r"\[train\].validation_share = 0.5 holds out all 1 training"):
        split_validation(examples[:1], 0.5, 0)


def test_eval_steps_zero_means_about_ten_evaluations():
    assert [eval_every(0, n) for n in (1, 8, 10, 11, 120)] == [1, 1, 1, 2, 12]
    assert eval_every(7, 120) == 7


def test_ties_keep_the_earlier_step():
    assert best_of([{"step": 2, "loss": 1.0}, {"step": 4, "loss": 1.0}])["step"] == 2
    assert best_of([]) is None
