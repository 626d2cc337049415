"""HF → GGUF for llama-architecture models, in process, on top of the ``gguf`` package.

The file written is what llama.cpp's own converter writes for such a model: the same
hyperparameter keys, the q/k rotary permutation, 1-D tensors kept in f32, no ``output.weight``
when the LM head is tied to the embeddings, and ``gpt2`` BPE tokenizer metadata (tokens, token
types, merges, special ids, chat template) with the matching ``tokenizer.ggml.pre``.

The pre-tokenizer name is read off the structure of ``tokenizer.json`` (see
:data:`PRE_TOKENIZERS`), not off a hash of sample tokenizations as llama.cpp's converter does; a
structure not in the table raises :class:`ModelError` rather than letting llama.cpp fall back to a
default that tokenizes differently from transformers.

Tensors are streamed one at a time from safetensors to the output file, so peak memory is about
one tensor, not the whole model.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...errors import ConfigError, ModelError
from ...loading import loading
from ...models import check_model_dir
from ...stage import StageOutput, content_hash, run_stage
from .inspect import GGUF_FILE

# outtype → (general.file_type, numpy dtype of 2-D tensors). 1-D tensors (norms, biases) stay f32
# whatever the outtype, as in llama.cpp: they are tiny and ggml's norm kernels expect f32.
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, type[np.floating]]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, np.float32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, np.float16),
}

# numpy dtype of a written tensor → its ggml type.
_GGML_TYPES: dict[type[np.floating], gguf.GGMLQuantizationType] = {
    np.float32: gguf.GGMLQuantizationType.F32,
    np.float16: gguf.GGMLQuantizationType.F16,
}

# HF architecture → llama.cpp architecture; same names as edgeft.models.SUPPORTED_ARCHITECTURES,
# which check_model_dir enforces (with the user-facing error) before we get here.
ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
}

# llama.cpp pre-tokenizer name → the tokenizer.json pre-tokenizer that splits text the same way,
# reduced by _pre_tokenizer_signature to the fields that change the split.
# "smollm" is llama.cpp's \p{N} split followed by the GPT-2 regex, i.e. Digits(individual) then
# ByteLevel(use_regex). llama.cpp's starcoder/refact/... types split identically; "smollm" is the
# one llama.cpp's converter writes for SmolLM2 and it also keeps clean_spaces off, which matches
# transformers' decoding of these byte-level tokenizers.
PRE_TOKENIZERS: dict[str, tuple[tuple[Any, ...], ...]] = {
    "smollm": (("Digits", True), ("ByteLevel", False, True)),
}

# HF tensors llama.cpp recomputes instead of loading.
_SKIPPED_TENSORS = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the output file: where it comes from and how it is written."""

    hf_name: str
    source: Path
    name: str
    shape: tuple[int, ...]
    dtype: type[np.floating]
    rotary_heads: int  # > 0: rows get the rotary permutation for this many heads


def export(model_dir: Path, out_dir: Path, outtype: str = "f32") -> StageOutput:
    """Stage wrapper: write ``out_dir/model.gguf`` (cached by model content and outtype)."""
    _check_outtype(outtype)
    inputs = {"model": content_hash(model_dir)}
    params = {"outtype": outtype}
    return run_stage(out_dir, "export", inputs, params, lambda tmp: write_gguf(model_dir, tmp / GGUF_FILE, outtype))


def write_gguf(model_dir: Path, out_file: Path, outtype: str = "f32") -> dict[str, Any]:
    """Convert the HF llama model in ``model_dir`` to a GGUF file; return what was written.

    Raises ModelError for a folder it cannot convert faithfully (architecture, rope scaling,
    tokenizer), ConfigError for an unknown ``outtype``.
    """
    _check_outtype(outtype)
    model_dir = Path(model_dir)
    config = check_model_dir(model_dir)
    arch = _architecture(config)
    file_type, dtype = OUTTYPES[outtype]
    tokenizer_json = _read_json(model_dir / "tokenizer.json")
    pre = _pre_tokenizer_name(model_dir, tokenizer_json)
    tensors = _plan_tensors(model_dir, config, arch, dtype)

    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[arch])
    try:  # in the order the file is laid out: header, key-values, tensor infos, tensor data
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(model_dir.name)
        _add_hparams(writer, model_dir, config, file_type)
        _add_tokenizer(writer, model_dir, config, tokenizer_json, pre)
        for t in tensors:
            n_bytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
            writer.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), n_bytes, _GGML_TYPES[t.dtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(_load_tensor(t))
    except BaseException:
        writer.close()
        Path(out_file).unlink(missing_ok=True)  # never leave a truncated GGUF behind
        raise
    writer.close()

    types = Counter(_GGML_TYPES[t.dtype].name for t in tensors)
    return {
        "architecture": gguf.MODEL_ARCH_NAMES[arch],
        "outtype": outtype,
        "n_tensors": len(tensors),
        "tensor_types": dict(sorted(types.items())),
        "tokenizer_pre": pre,
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
        "bytes": out_file.stat().st_size,
    }


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotary layout to the one llama.cpp expects.

    HF llama rotates dimension i of a head together with i + head_dim/2 ("rotate_half"); llama.cpp's
    llama rope rotates adjacent pairs (2i, 2i+1). Within each head, row 2i of the result is row i
    of the input and row 2i+1 is row i + head_dim/2. Works for weights [rows, cols] and biases [rows].
    """
    rows = weights.shape[0]
    per_half = rows // n_head // 2
    return weights.reshape(n_head, 2, per_half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; GGUF export needs a fast (tokenizer.json) tokenizer") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read ({e})") from None


def _architecture(config: dict[str, Any]) -> gguf.MODEL_ARCH:
    """llama.cpp architecture of a folder that check_model_dir accepted (its tables agree)."""
    return next(ARCHITECTURES[name] for name in config["architectures"] if name in ARCHITECTURES)


def _rope_theta(model_dir: Path, config: dict[str, Any]) -> float:
    """Rope base frequency; only unscaled rope is supported (transformers 5 and 4.x layouts)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelError(f"{model_dir}/config.json: rope_type {rope_type!r} is not supported; expected 'default'")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _add_hparams(
    writer: gguf.GGUFWriter, model_dir: Path, config: dict[str, Any], file_type: gguf.LlamaFileType
) -> None:
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    # llama.cpp's converter writes these whenever config.json has head_dim (transformers 5 always
    # writes it); they matter for models whose head_dim is not hidden_size / n_head.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(model_dir, config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _pre_tokenizer_signature(node: dict[str, Any] | None) -> tuple[tuple[Any, ...], ...]:
    """The fields of a tokenizer.json pre-tokenizer that change how text is split."""
    if node is None:
        return ()
    if node.get("type") == "Sequence":
        return tuple(s for child in node.get("pretokenizers", []) for s in _pre_tokenizer_signature(child))
    if node.get("type") == "Digits":
        return (("Digits", node.get("individual_digits")),)
    if node.get("type") == "ByteLevel":
        return (("ByteLevel", node.get("add_prefix_space"), node.get("use_regex")),)
    return ((node.get("type"), json.dumps(node, sort_keys=True)),)


def _pre_tokenizer_name(model_dir: Path, tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for this byte-level BPE tokenizer, or ModelError."""
    model_type = (tokenizer_json.get("model") or {}).get("type")
    decoder_type = (tokenizer_json.get("decoder") or {}).get("type")
    if model_type != "BPE" or decoder_type != "ByteLevel":
        raise ModelError(
            f"{model_dir}/tokenizer.json: tokenizer model {model_type}/{decoder_type} is not supported; "
            "expected byte-level BPE (gpt2)"
        )
    signature = _pre_tokenizer_signature(tokenizer_json.get("pre_tokenizer"))
    if tokenizer_json.get("normalizer") is None:
        for name, known in PRE_TOKENIZERS.items():
            if signature == known:
                return name
    raise ModelError(
        f"{model_dir}/tokenizer.json: unrecognised pre-tokenizer {signature} "
        f"(normalizer {tokenizer_json.get('normalizer')}); known llama.cpp pre-tokenizers: "
        f"{', '.join(PRE_TOKENIZERS)}"
    )


def _add_tokenizer(
    writer: gguf.GGUFWriter,
    model_dir: Path,
    config: dict[str, Any],
    tokenizer_json: dict[str, Any],
    pre: str,
) -> None:
    """Write gpt2-BPE tokenizer metadata the way llama.cpp's converter does."""
    vocab_size = config["vocab_size"]
    id_to_token = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    added = {a["id"]: a for a in tokenizer_json.get("added_tokens", [])}
    id_to_token.update({i: a["content"] for i, a in added.items()})
    if max(id_to_token) >= vocab_size:
        raise ModelError(
            f"{model_dir}/tokenizer.json: token id {max(id_to_token)} does not fit config.json vocab_size {vocab_size}"
        )

    tokens: list[str] = []
    types: list[gguf.TokenType] = []
    for i in range(vocab_size):
        token = id_to_token.get(i)
        if token is None:  # embedding rows with no token (vocab padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if _is_control(added[i]) else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    # SpecialVocab only learns add_bos from a post-processor that prepends BOS; when there is none,
    # transformers adds no BOS, so say so explicitly instead of leaving llama.cpp to guess.
    special.add_special_token.setdefault("bos", False)
    special.add_to_gguf(writer, quiet=True)


def _is_control(added_token: dict[str, Any]) -> bool:
    """Added tokens that llama.cpp must treat as control tokens (never produced from plain text).

    Besides tokens flagged special, llama.cpp's converter also treats ``<|...|>`` tokens as control
    because some tokenizers forget the flag.
    """
    content = added_token["content"]
    return bool(added_token.get("special")) or (content.startswith("<|") and content.endswith("|>"))


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors weights; save the model with safetensors")
    return files


def _plan_tensors(
    model_dir: Path, config: dict[str, Any], arch: gguf.MODEL_ARCH, dtype: type[np.floating]
) -> list[_Tensor]:
    """Map every HF tensor to its GGUF name, type and permutation, without loading any data."""
    from safetensors import safe_open

    name_map = gguf.TensorNameMap(arch, config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    n_head = config["num_attention_heads"]
    rotary_heads = {
        gguf.MODEL_TENSOR.ATTN_Q: n_head,
        gguf.MODEL_TENSOR.ATTN_K: config.get("num_key_value_heads") or n_head,
    }
    plan: list[_Tensor] = []
    for path in _safetensors_files(model_dir):
        with loading(path, "safetensors weights"), safe_open(path, framework="pt") as f:
            for hf_name in f.keys():
                if hf_name.endswith(_SKIPPED_TENSORS):
                    continue
                mapped = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
                if mapped is None:
                    raise ModelError(f"{path}: tensor {hf_name} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch]}")
                kind, name = mapped
                # Tied head: llama.cpp reuses token_embd when output.weight is absent.
                if kind == gguf.MODEL_TENSOR.OUTPUT and tied:
                    continue
                shape = tuple(f.get_slice(hf_name).get_shape())
                plan.append(
                    _Tensor(
                        hf_name=hf_name,
                        source=path,
                        name=name,
                        shape=shape,
                        dtype=dtype if len(shape) > 1 else np.float32,
                        rotary_heads=rotary_heads.get(kind, 0),
                    )
                )
    names = {t.name for t in plan}
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    if not tied and output not in names:
        raise ModelError(f"{model_dir}: no lm_head.weight and tie_word_embeddings is false in config.json")
    return plan


def _load_tensor(t: _Tensor) -> np.ndarray:
    """Read one tensor as fp32 (any stored dtype, bf16 included), permute, cast to its GGUF type."""
    from safetensors import safe_open

    with loading(t.source, f"tensor {t.hf_name}"), safe_open(t.source, framework="pt") as f:
        data = f.get_tensor(t.hf_name).float().numpy()
    if not np.isfinite(data).all():  # a broken model must not become a shippable artifact
        raise ModelError(f"{t.source}: tensor {t.hf_name} holds NaN or Inf values; refusing to export it")
    if t.rotary_heads:
        data = permute_rotary(data, t.rotary_heads)
    return np.ascontiguousarray(data.astype(t.dtype, copy=False))
