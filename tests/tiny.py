"""Tiny llama models for fast tests: random weights, the real SmolLM2 tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path


def make_tiny_llama(
    folder: Path,
    tokenizer,
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tied: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random llama with ``tokenizer`` into ``folder`` and return the folder.

    With the default init (std 0.02) attention is almost uniform and a wrong rotary layout would
    barely move the logits; std 0.2 and non-unit norm weights make every tensor matter.
    K-quant tests need ``hidden`` and ``intermediate`` multiples of 256.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,  # GQA: q and k are permuted with different head counts
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.copy_(1 + 0.2 * torch.randn_like(param))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
