"""Tiny models for fast tests: random weights from a transformers config, a real tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# family → (config class, model class, extra config keys). Each keeps the layout that matters for
# its GGUF conversion: GQA (q and k permuted with different head counts), qwen2's q/k/v biases,
# qwen3's q/k norms and a head_dim that is not hidden/heads, gemma3's sliding/full layer pattern
# with a window shorter than the test sequences and its own local rope base, phi3's fused tensors
# with partial rotary dims.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 24,
            "query_pre_attn_scalar": 24,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 20_000.0},
            },
            "num_hidden_layers": 4,
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.75, "pad_token_id": None}),
    # Not a native family: GGUF export hands it to llama.cpp's converter.
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {"partial_rotary_factor": 0.5}),
}


def make_tiny_model(
    folder: Path,
    tokenizer,
    family: str = "llama",
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tied: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random model of ``family`` with ``tokenizer`` into ``folder`` and return the folder.

    With the default init (std 0.02) attention is almost uniform and a wrong rotary layout would
    barely move the logits; std 0.2 and norm weights away from their neutral value make every
    tensor matter. K-quant tests need ``hidden`` and ``intermediate`` multiples of 256.
    """
    import torch
    import transformers

    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 512,
        "initializer_range": 0.2,
        "tie_word_embeddings": tied,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **extra,
    }
    config = getattr(transformers, config_class)(**settings)
    model = getattr(transformers, model_class)(config)
    neutral = 0.0 if family == "gemma3" else 1.0  # gemma's norms scale by 1 + w
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                offset = neutral if "norm" in name else 0.0
                param.copy_(offset + 0.2 * torch.randn_like(param))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def make_tiny_llama(folder: Path, tokenizer, **kwargs: Any) -> Path:
    """A tiny random llama (see :func:`make_tiny_model`)."""
    return make_tiny_model(folder, tokenizer, "llama", **kwargs)


COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"

# [bench] for builds of tiny models: short prompts and generations, one thread, one golden prompt
TINY_BENCH = (
    "[bench]\nthreads = 1\nmax_new_tokens = 8\nprompt_tokens = 64\ndecode_tokens = 8\nrepeats = 2\n"
    "top_k = 8\ngolden = 1\nladder_export = false\n"
)


def tiny_build_config(folder: Path, tokenizer, train: str, *, train_rows: int = 12, extra: str = "") -> Path:
    """An edgeft.toml over a tiny llama and the first rows of the cooking data, in ``folder``.
    ``train`` is the body of its [train] table; ``extra`` more tables after [bench]."""
    model = make_tiny_llama(folder / "model", tokenizer)
    train_file, eval_file = folder / "train.jsonl", folder / "eval.jsonl"
    train_file.write_text("".join((COOKING / "train.jsonl").read_text().splitlines(keepends=True)[:train_rows]))
    eval_file.write_text("".join((COOKING / "eval.jsonl").read_text().splitlines(keepends=True)[:3]))
    cfg = folder / "edgeft.toml"
    cfg.write_text(
        f'model = "{model}"\n[data]\ntrain = "{train_file}"\neval = "{eval_file}"\n[train]\n{train}{TINY_BENCH}{extra}'
    )
    return cfg


def held_out_chats(tokenizer, n: int) -> list[list[int]]:
    """Token ids of the first ``n`` cooking eval conversations, chat template applied."""
    from edgeft.data import load_jsonl

    out = []
    for ex in load_jsonl(COOKING / "eval.jsonl")[:n]:
        ids = tokenizer.apply_chat_template(ex.messages, tokenize=True, return_dict=False)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def held_out_kld(ref, other, tokenizer, n: int) -> float:
    """Mean KL divergence of runtime ``other`` from runtime ``ref`` (anything with ``logits(ids)``)
    over every position of the first ``n`` cooking eval conversations."""
    import numpy as np

    def log_probs(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    rows = []
    for ids in held_out_chats(tokenizer, n):
        lp, lq = log_probs(ref.logits(ids)), log_probs(other.logits(ids))
        rows.append((np.exp(lp) * (lp - lq)).sum(-1))
    return float(np.concatenate(rows).mean())


def make_uneven_tiny_llama(folder: Path, tokenizer, *, seed: int, loud: int, **kwargs: Any) -> Path:
    """A tiny llama whose weight groups differ in how much their rounding moves the logits: norms
    away from 1, and layer 1 reading ``loud`` very loud channels (it should come out most sensitive).
    For the mixed-precision tests, which need something to choose between."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = make_tiny_llama(folder, tokenizer, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(torch.exp(0.8 * torch.randn(p.shape, generator=gen)))
                if ".1." in name:
                    p[torch.randperm(p.numel(), generator=gen)[:loud]] *= 12.0
    model.save_pretrained(hf)
    return hf


def uneven_onnx_exports(root: Path, tokenizer, *, seed: int, calib_tokens: int) -> dict:
    """For the ONNX rounding and mixed tests: an uneven tiny tied llama (3 layers of 128), its fp32
    and builder-int4 ONNX exports, and a task calibration set of the cooking data (128-token chunks)."""
    from edgeft.calibration import build_set
    from edgeft.formats.onnx.export import export

    hf = make_uneven_tiny_llama(
        root / "hf", tokenizer, seed=seed, loud=6, hidden=128, intermediate=256, layers=3, heads=4, kv_heads=2
    )
    calib = build_set("task", tokenizer, COOKING / "train.jsonl", tokens=calib_tokens, chunk_tokens=128, task_share=0.5)
    return {
        "hf": hf,
        "root": root,
        "fp32": export(hf, root / "onnx-fp32", "fp32", {}).path,
        "int4": export(hf, root / "onnx-int4", "int4", {}).path,
        "calib": calib,
    }


def assert_target_refused(folder: Path, monkeypatch, text: str, message: str) -> None:
    """A target file ``x.toml`` holding ``text`` is refused, when read, with ``x.toml: <message>``."""
    import re

    import pytest

    from edgeft.errors import ConfigError
    from edgeft.targets import get_target

    monkeypatch.setenv("EDGEFT_TARGETS", str(folder))
    (folder / "x.toml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape("x.toml: " + message)):
        get_target("x")
