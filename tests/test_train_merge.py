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
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
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


@pytest.mark.slow
def test_train_writes_a_peft_adapter_and_caches(tiny_llama_dir, small_train, tmp_path):
    from edgeft.train import train

    out = train(tiny_llama_dir, small_train, tmp_path / "adapter", TrainConfig(**FAST))
    assert not out.cached
    files = {p.name for p in out.path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= files
    assert not any(n.startswith("_") for n in files)  # trainer scratch removed
    cfg = json.loads((out.path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == set(TrainConfig().target_modules)
    assert out.manifest["results"]["steps"] == 3

    again = train(tiny_llama_dir, small_train, tmp_path / "adapter", TrainConfig(**FAST))
    assert again.cached
    changed = train(tiny_llama_dir, small_train, tmp_path / "adapter", TrainConfig(**{**FAST, "rank": 8}))
    assert not changed.cached and json.loads((changed.path / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.slow
def test_training_lowers_the_loss(tiny_llama_dir, small_train, tmp_path):
    from edgeft.train import train_adapter

    (tmp_path / "a").mkdir()
    stats = train_adapter(
        tiny_llama_dir, small_train, tmp_path / "a", TrainConfig(**{**FAST, "max_steps": 12, "batch_size": 16})
    )
    assert stats["last_logged_loss"] < stats["first_logged_loss"]


def test_merged_model_matches_base_plus_adapter(tiny_llama_dir, small_train, tmp_path, tokenizer):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgeft.merge import merge
    from edgeft.train import train

    adapter = train(tiny_llama_dir, small_train, tmp_path / "adapter", TrainConfig(**FAST)).path
    merged = merge(tiny_llama_dir, adapter, tmp_path / "merged")
    assert (merged.path / "model.safetensors").is_file() and (merged.path / "tokenizer.json").is_file()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Safe temp for pork?"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        plain = base(ids).logits.numpy()
        lora = PeftModel.from_pretrained(base, adapter)(ids).logits.numpy()
        flat = AutoModelForCausalLM.from_pretrained(merged.path, dtype=torch.float32)(ids).logits.numpy()
    assert np.abs(lora - plain).max() > 1e-3  # the adapter changed something...
    np.testing.assert_allclose(flat, lora, atol=2e-4, rtol=0)  # ...and merging kept exactly that
    assert merge(tiny_llama_dir, adapter, tmp_path / "merged").cached


def test_merge_rejects_a_folder_that_is_not_an_adapter(tiny_llama_dir, tmp_path):
    from edgeft.errors import ModelError
    from edgeft.merge import merge

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="adapter_config.json missing"):
        merge(tiny_llama_dir, tmp_path / "empty", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_qlora_loads_the_base_in_nf4_with_double_quantization(tiny_llama_dir):
    import bitsandbytes as bnb

    from edgeft.nf4 import load_nf4

    model = load_nf4(tiny_llama_dir, "float32")
    linears = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(linears) == set(TrainConfig().target_modules)  # every decoder linear; lm_head stays full precision
    state = linears["q_proj"].weight.quant_state
    assert state.quant_type == "nf4" and state.nested and state.blocksize == 64  # nested: double quantization


@pytest.mark.slow
def test_qlora_trains_on_cpu_and_lowers_the_loss(tiny_llama_dir, small_train, tmp_path):
    from edgeft.train import train_adapter

    (tmp_path / "a").mkdir()
    cfg = TrainConfig(**{**FAST, "method": "qlora", "max_steps": 12, "batch_size": 16, "precision": "fp32"})
    stats = train_adapter(tiny_llama_dir, small_train, tmp_path / "a", cfg)
    assert stats["method"] == "qlora" and stats["device"] == "cpu" and stats["compute_dtype"] == "float32"
    assert stats["steps"] == 12
    assert stats["last_logged_loss"] < stats["first_logged_loss"]
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def qlora_adapter(tiny_llama_dir, small_train, tmp_path_factory) -> Path:
    from edgeft.train import train

    cfg = TrainConfig(**{**FAST, "method": "qlora", "precision": "fp32", "max_steps": 6})
    return train(tiny_llama_dir, small_train, tmp_path_factory.mktemp("qlora") / "adapter", cfg).path


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join((COOKING / "eval.jsonl").read_text().splitlines(keepends=True)[:6]))
    return path


@pytest.mark.slow
def test_dequant_merge_is_the_nf4_weights_plus_the_adapter_delta(tiny_llama_dir, qlora_adapter, tmp_path):
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import load_file

    from edgeft.merge import merge

    out = merge(tiny_llama_dir, qlora_adapter, tmp_path / "merged", "dequant")
    assert out.manifest["results"]["strategy"] == "dequant"
    merged = load_file(out.path / "model.safetensors")
    base = load_file(tiny_llama_dir / "model.safetensors")
    lora = load_file(qlora_adapter / "adapter_model.safetensors")
    scale = FAST["alpha"] / FAST["rank"]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        packed, state = F.quantize_4bit(base[name], blocksize=64, compress_statistics=True, quant_type="nf4")
        nf4 = F.dequantize_4bit(packed, state)
        stem = "base_model.model." + name.removesuffix(".weight")
        delta = lora[f"{stem}.lora_B.weight"] @ lora[f"{stem}.lora_A.weight"] * scale
        assert not torch.equal(nf4, base[name]) and delta.abs().max() > 0
        torch.testing.assert_close(merged[name], nf4 + delta, rtol=0, atol=1e-6)
    for name in ("model.embed_tokens.weight", "model.norm.weight"):  # never quantized: the base's own
        assert torch.equal(merged[name], base[name])


def test_auto_merge_keeps_the_strategy_with_the_lower_kld_and_records_both(
    tiny_llama_dir, qlora_adapter, small_eval, tmp_path
):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from edgeft.merge import held_out_sequences, mean_kld, merge
    from edgeft.nf4 import load_nf4, without_cpu_bf16_kernel

    out = merge(tiny_llama_dir, qlora_adapter, tmp_path / "auto", "auto", small_eval)
    results = out.manifest["results"]
    kld = results["kld_vs_adapter_on_nf4_base"]
    assert set(kld) == {"fp", "dequant"} and results["requested"] == "auto"
    assert results["strategy"] == min(kld, key=kld.get)
    # The dequant merge computes what the adapter on the 4-bit base computes; the fp merge does not.
    assert kld["dequant"] < 1e-6 < kld["fp"]
    assert results["kld_conversations"] == 6 and out.manifest["inputs"]["eval"]

    chosen = merge(tiny_llama_dir, qlora_adapter, tmp_path / results["strategy"], results["strategy"])
    a, b = load_file(out.path / "model.safetensors"), load_file(chosen.path / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # what was written is the chosen merge

    # The recorded figure is the KLD of the written model against the adapter on the NF4 base, measured again.
    from transformers import AutoTokenizer

    teacher = PeftModel.from_pretrained(
        without_cpu_bf16_kernel(load_nf4(tiny_llama_dir, "float32")), qlora_adapter
    ).eval()
    written = AutoModelForCausalLM.from_pretrained(out.path, dtype=torch.float32).eval()
    seqs = held_out_sequences(AutoTokenizer.from_pretrained(tiny_llama_dir), small_eval)
    again = mean_kld(teacher, {"written": written}, seqs)["written"]
    assert again == pytest.approx(kld[results["strategy"]], abs=1e-7)


def test_a_lora_adapter_merges_into_the_fp_base_only(tiny_llama_dir, small_train, small_eval, tmp_path):
    from edgeft.errors import ConfigError
    from edgeft.merge import merge
    from edgeft.train import train

    adapter = train(tiny_llama_dir, small_train, tmp_path / "adapter", TrainConfig(**FAST)).path
    with pytest.raises(ConfigError, match="'dequant'.*method = 'lora'"):
        merge(tiny_llama_dir, adapter, tmp_path / "merged", "dequant")
    auto = merge(tiny_llama_dir, adapter, tmp_path / "merged", "auto", small_eval)  # nothing to compare: fp
    assert auto.manifest["params"]["strategy"] == "fp" and "kld_vs_adapter_on_nf4_base" not in auto.manifest["results"]
