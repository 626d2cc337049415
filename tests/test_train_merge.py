"""train and merge on a tiny llama with the real SmolLM2 tokenizer and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeft.config import TrainConfig
from edgeft.data import load_jsonl
from edgeft.train import IGNORE_INDEX, tokenize_example

from .tiny import make_tiny_llama

COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", tokenizer)


@pytest.fixture(scope="module")
def small_train(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join((COOKING / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
    return path


FAST = dict(max_steps=3, batch_size=4, learning_rate=1e-2, rank=4, alpha=8, seed=0)


def test_labels_cover_exactly_the_assistant_reply(tokenizer):
    ex = load_jsonl(COOKING / "eval.jsonl")[0]
    row = tokenize_example(tokenizer, ex, 512)
    kept = [t for t, lbl in zip(row["input_ids"], row["labels"]) if lbl != IGNORE_INDEX]
    assert tokenizer.decode(kept) == ex.reply + "<|im_end|>\n"
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>system")


def test_truncation_keeps_lengths_aligned(tokenizer):
    ex = load_jsonl(COOKING / "eval.jsonl")[0]
    row = tokenize_example(tokenizer, ex, 10)
    assert len(row["input_ids"]) == len(row["labels"]) == 10


def test_train_writes_a_peft_adapter_and_caches(tiny, small_train, tmp_path):
    from edgeft.train import train

    out = train(tiny, small_train, tmp_path / "adapter", TrainConfig(**FAST))
    assert not out.cached
    files = {p.name for p in out.path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= files
    assert not any(n.startswith("_") for n in files)  # trainer scratch removed
    cfg = json.loads((out.path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == set(TrainConfig().target_modules)
    assert out.manifest["results"]["steps"] == 3

    again = train(tiny, small_train, tmp_path / "adapter", TrainConfig(**FAST))
    assert again.cached
    changed = train(tiny, small_train, tmp_path / "adapter", TrainConfig(**{**FAST, "rank": 8}))
    assert not changed.cached and json.loads((changed.path / "adapter_config.json").read_text())["r"] == 8


def test_training_lowers_the_loss(tiny, small_train, tmp_path):
    from edgeft.train import train_adapter

    (tmp_path / "a").mkdir()
    stats = train_adapter(tiny, small_train, tmp_path / "a", TrainConfig(**{**FAST, "max_steps": 12, "batch_size": 16}))
    assert stats["last_logged_loss"] < stats["first_logged_loss"]


def test_merged_model_matches_base_plus_adapter(tiny, small_train, tmp_path, tokenizer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgeft.merge import merge
    from edgeft.train import train

    adapter = train(tiny, small_train, tmp_path / "adapter", TrainConfig(**FAST)).path
    merged = merge(tiny, adapter, tmp_path / "merged")
    assert (merged.path / "model.safetensors").is_file() and (merged.path / "tokenizer.json").is_file()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Safe temp for pork?"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
        plain = base(ids).logits.numpy()
        lora = PeftModel.from_pretrained(base, adapter)(ids).logits.numpy()
        flat = AutoModelForCausalLM.from_pretrained(merged.path, dtype=torch.float32)(ids).logits.numpy()
    assert np.abs(lora - plain).max() > 1e-3  # the adapter changed something...
    np.testing.assert_allclose(flat, lora, atol=2e-4, rtol=0)  # ...and merging kept exactly that
    assert merge(tiny, adapter, tmp_path / "merged").cached


def test_merge_rejects_a_folder_that_is_not_an_adapter(tiny, tmp_path):
    from edgeft.errors import ModelError
    from edgeft.merge import merge

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="adapter_config.json missing"):
        merge(tiny, tmp_path / "empty", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_qlora_loads_the_base_in_nf4_with_double_quantization(tiny):
    import bitsandbytes as bnb

    from edgeft.nf4 import load_nf4

    model = load_nf4(tiny, "float32")
    linears = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(linears) == set(TrainConfig().target_modules)  # every decoder linear; lm_head stays full precision
    state = linears["q_proj"].weight.quant_state
    assert state.quant_type == "nf4" and state.nested and state.blocksize == 64  # nested: double quantization


def test_qlora_trains_on_cpu_and_lowers_the_loss(tiny, small_train, tmp_path):
    from edgeft.train import train_adapter

    (tmp_path / "a").mkdir()
    cfg = TrainConfig(**{**FAST, "method": "qlora", "max_steps": 12, "batch_size": 16, "precision": "fp32"})
    stats = train_adapter(tiny, small_train, tmp_path / "a", cfg)
    assert stats["method"] == "qlora" and stats["device"] == "cpu" and stats["compute_dtype"] == "float32"
    assert stats["steps"] == 12
    assert stats["last_logged_loss"] < stats["first_logged_loss"]
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
