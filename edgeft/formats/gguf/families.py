"""Model families the native GGUF exporter writes: one row per Hugging Face architecture.

A row says which llama.cpp architecture the model becomes, which hyper-parameters llama.cpp reads
for it and how tensors change on the way. Tensor *names* are not tabled here: gguf-py's
``TensorNameMap`` for the llama.cpp architecture already maps every HF name of these families
(fused phi3 ``qkv_proj``/``gate_up_proj`` included).

What differs between families, checked against llama.cpp's loaders:

* rotary layout: llama.cpp runs llama/mistral with "normal" rope (adjacent pairs rotate), so the
  HF q/k rows are permuted (:func:`permute_rotary`); qwen2, qwen3, gemma3 and phi3 use "neox" rope,
  which is HF's own layout, and are written as they are;
* gemma3 stores RMSNorm weights as ``w`` for a scale of ``1 + w``; llama.cpp multiplies by the
  stored weight, so ``1`` is added to every ``*norm.weight``. Its embedding is stored unscaled:
  llama.cpp multiplies by ``sqrt(hidden_size)`` at run time, as transformers does;
* sliding-window attention: gemma3 mixes sliding and full layers (a period), phi3 may slide on every
  layer; llama-architecture models cannot slide in llama.cpp, so a mistral window caps the context.

Anything a row cannot express exactly (rope scaling other than Llama 3.1's, attention scales llama.cpp
does not read)
raises :class:`ModelError` naming the config key, so an export is faithful or refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from ...errors import ModelError

Config = dict[str, Any]
HParams = Callable[[gguf.GGUFWriter, Path, Config], None]
ExtraTensors = Callable[[Path, Config], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Family:
    """How one HF architecture becomes a llama.cpp one."""

    arch: gguf.MODEL_ARCH
    hparams: HParams  # writes the architecture's hyper-parameter keys
    permute_qk: bool = False  # llama.cpp's "normal" rope: q/k rows get the rotary permutation
    norm_shift: float = 0.0  # added to every *norm.weight (gemma's 1 + w convention)
    tied_default: bool = False  # tie_word_embeddings when config.json omits it (its config class default)
    extra_tensors: ExtraTensors | None = None  # tensors llama.cpp reads that the HF model computes


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotary layout to the one llama.cpp's llama rope expects.

    HF rotates dimension i of a head together with i + head_dim/2 ("rotate_half"); llama.cpp's
    "normal" rope rotates adjacent pairs (2i, 2i+1). Within each head, row 2i of the result is row
    i of the input and row 2i+1 is row i + head_dim/2. Works for weights [rows, cols] and biases.
    """
    rows = weights.shape[0]
    per_half = rows // n_head // 2
    return weights.reshape(n_head, 2, per_half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


# --- hyper-parameters ---------------------------------------------------------------------------


def head_dim(config: Config) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope(
    model_dir: Path, config: Config, layer_kind: str | None = None, allowed: tuple[str, ...] = ("default",)
) -> dict[str, Any]:
    """Rope parameters (transformers 5 ``rope_parameters``, 4.x ``rope_scaling``/``rope_theta``).

    Unscaled rope is exact in every family here, Llama 3.1's ``llama3`` scaling in the llama one
    (``allowed``); anything else is refused. ``layer_kind`` picks one entry of a per-layer-type
    dict (gemma3: full_attention / sliding_attention).
    """
    rope = _rope_entry(config, layer_kind)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in allowed:
        where = f"rope_parameters.{layer_kind}" if layer_kind else "rope_parameters"
        expected = " or ".join(repr(a) for a in allowed)
        raise ModelError(
            f"{model_dir}/config.json: {where}: rope_type {rope_type!r} is not supported; expected {expected}"
        )
    return rope


def _rope_entry(config: Config, layer_kind: str | None = None) -> dict[str, Any]:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope[layer_kind] if layer_kind is not None and layer_kind in rope else rope


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def llama3_rope_factors(model_dir: Path, config: Config) -> np.ndarray:
    """Llama 3.1's rope scaling as llama.cpp reads it: one divisor per rotated pair (``rope_freqs``).

    transformers rescales each inverse frequency by its wavelength band: short wavelengths (below
    ``original_max_position_embeddings / high_freq_factor``) stay, long ones (above ``... /
    low_freq_factor``) are divided by ``factor``, and the band between blends the two. llama.cpp
    divides each pair's angle by the stored factor instead, so the factor is the ratio of the
    original inverse frequency to the scaled one.
    """
    rope = _rope_entry(config)
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in rope]
    if missing:
        raise ModelError(f"{model_dir}/config.json: rope_parameters: rope_type 'llama3' needs {', '.join(missing)}")
    factor, low, high, old = (float(rope[k]) for k in LLAMA3_ROPE_KEYS)
    if not (factor > 0 and high > low > 0 and old > 0):
        raise ModelError(
            f"{model_dir}/config.json: rope_parameters: expected factor > 0 and high_freq_factor > "
            f"low_freq_factor > 0, got {factor:g}, {high:g}, {low:g}"
        )
    base = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    dims = head_dim(config)
    inv_freq = base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)
    wavelen = 2 * np.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, blended))
    return factors.astype(np.float32)


def _llama3_extra_tensors(model_dir: Path, config: Config) -> dict[str, np.ndarray]:
    rope = _rope_entry(config)
    if rope.get("rope_type", rope.get("type", "default")) != "llama3":
        return {}
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": llama3_rope_factors(model_dir, config)}


def _rope_theta(
    model_dir: Path,
    config: Config,
    layer_kind: str | None = None,
    default: float = 10000.0,
    allowed: tuple[str, ...] = ("default",),
) -> float:
    rope = _rope(model_dir, config, layer_kind, allowed)
    return float(rope.get("rope_theta", config.get("rope_theta", default)))


def _common(writer: gguf.GGUFWriter, model_dir: Path, config: Config, rope_dims: int | None = None) -> None:
    """Keys every family here shares (what llama.cpp's llama loader reads)."""
    n_head = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    # llama.cpp's converter writes these whenever config.json has head_dim (transformers 5 always
    # writes it); they matter for models whose head_dim is not hidden_size / n_head (qwen3, gemma3).
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(rope_dims or head_dim(config))


def _llama(writer: gguf.GGUFWriter, model_dir: Path, config: Config) -> None:
    """Llama, Llama 3.1's rope scaling included (its factors go in a tensor: :func:`llama3_rope_factors`)."""
    _common(writer, model_dir, config)
    writer.add_rope_freq_base(_rope_theta(model_dir, config, allowed=("default", "llama3")))


def _unscaled(writer: gguf.GGUFWriter, model_dir: Path, config: Config) -> None:
    """Llama's keys for a family whose rope llama.cpp runs unscaled only (qwen2, qwen3)."""
    _common(writer, model_dir, config)
    writer.add_rope_freq_base(_rope_theta(model_dir, config))


def _mistral(writer: gguf.GGUFWriter, model_dir: Path, config: Config) -> None:
    """Llama with an optional sliding window (Mistral 7B v0.1: 4096 of 32768 positions).

    llama.cpp runs mistral as llama, without a window; within the window the two agree exactly, so
    the context written is capped at the window instead of silently attending beyond it.
    """
    _unscaled(writer, model_dir, config)
    window = config.get("sliding_window")
    if window and window < config["max_position_embeddings"]:
        writer.add_context_length(window)  # GGUFWriter keeps the last value written for a key


def _qwen2(writer: gguf.GGUFWriter, model_dir: Path, config: Config) -> None:
    if config.get("use_sliding_window"):
        raise ModelError(f"{model_dir}/config.json: use_sliding_window: true is not supported; expected false")
    _unscaled(writer, model_dir, config)


def _gemma3(writer: gguf.GGUFWriter, model_dir: Path, config: Config) -> None:
    """Gemma 3: sliding and full layers with their own rope bases, 1/sqrt(head_dim) attention."""
    config_file = f"{model_dir}/config.json"
    scalar = config.get("query_pre_attn_scalar", head_dim(config))
    if scalar != head_dim(config):  # llama.cpp scales attention by 1/sqrt(head_dim) for these sizes
        raise ModelError(
            f"{config_file}: query_pre_attn_scalar {scalar} is not supported; expected head_dim {head_dim(config)}"
        )
    if config.get("attn_logit_softcapping"):
        raise ModelError(f"{config_file}: attn_logit_softcapping is not supported by llama.cpp's gemma3; expected null")
    _common(writer, model_dir, config)
    writer.add_rope_freq_base(_rope_theta(model_dir, config, "full_attention", 1_000_000.0))
    if softcap := config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(softcap)
    period = _sliding_period(config_file, config)
    if period:
        writer.add_sliding_window(config["sliding_window"])
        writer.add_sliding_window_pattern(period)
        local_base = config.get("rope_local_base_freq", 10000.0)
        writer.add_rope_freq_base_swa(_rope_theta(model_dir, config, "sliding_attention", local_base))


def _sliding_period(config_file: str, config: Config) -> int:
    """Period p of gemma3's layer pattern (p-1 sliding layers, then one full), 0 if none slides.

    llama.cpp describes the pattern by its period only, so a layer_types list that is not periodic
    in that way cannot be written.
    """
    n_layers = config["num_hidden_layers"]
    types = config.get("layer_types")
    if types is None:
        pattern = config.get("sliding_window_pattern", 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    if not config.get("sliding_window") or "sliding_attention" not in types:
        return 0
    full = [i for i, kind in enumerate(types) if kind == "full_attention"]
    period = full[0] + 1 if full else n_layers + 1
    expected = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)]
    if types != expected:
        raise ModelError(f"{config_file}: layer_types {types} is not a repeating (sliding..., full) pattern")
    return period


def _phi3(writer: gguf.GGUFWriter, model_dir: Path, config: Config) -> None:
    """Phi-3/Phi-4-mini: partial rotary dims, an optional window on every layer (0 = none)."""
    rope = _rope(model_dir, config)
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    _common(writer, model_dir, config, rope_dims=int(partial * head_dim(config)))
    writer.add_rope_freq_base(_rope_theta(model_dir, config))
    original = config.get("original_max_position_embeddings") or config["max_position_embeddings"]
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_sliding_window(config.get("sliding_window") or 0)


# HF architecture → family. edgeft.models.SUPPORTED_ARCHITECTURES lists the same names (a test checks).
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, _llama, permute_qk=True, extra_tensors=_llama3_extra_tensors),
    "MistralForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, _mistral, permute_qk=True),
    "Qwen2ForCausalLM": Family(gguf.MODEL_ARCH.QWEN2, _qwen2),
    "Qwen3ForCausalLM": Family(gguf.MODEL_ARCH.QWEN3, _unscaled),
    "Gemma3ForCausalLM": Family(gguf.MODEL_ARCH.GEMMA3, _gemma3, norm_shift=1.0, tied_default=True),
    "Phi3ForCausalLM": Family(gguf.MODEL_ARCH.PHI3, _phi3),
}


def family_of(config: Config) -> tuple[str, Family] | None:
    """(HF architecture, family) of a config, or None when no family here handles it."""
    for name in config.get("architectures") or []:
        if name in FAMILIES:
            return name, FAMILIES[name]
    return None


def rotary_heads(family: Family, config: Config) -> dict[gguf.MODEL_TENSOR, int]:
    """Tensor kind → head count for the q/k permutation (empty for neox-rope families)."""
    if not family.permute_qk:
        return {}
    n_head = config["num_attention_heads"]
    return {
        gguf.MODEL_TENSOR.ATTN_Q: n_head,
        gguf.MODEL_TENSOR.ATTN_K: config.get("num_key_value_heads") or n_head,
    }


def is_tied(family: Family, config: Config) -> bool:
    return bool(config.get("tie_word_embeddings", family.tied_default))


__all__ = ["FAMILIES", "Family", "family_of", "head_dim", "is_tied", "permute_rotary", "rotary_heads"]
