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
