"""tokenizer.json → llama.cpp tokenizer metadata, written the way llama.cpp's converter writes it.

Two vocabulary kinds, told apart by tokenizer.json's structure (:func:`vocab_kind`):

* ``gpt2``: byte-level BPE (SmolLM2, Llama 3, Qwen 2/3): tokens, types, merges and a pre-tokenizer
  name;
* ``llama``: SentencePiece-style BPE over ``▁``-escaped text with byte fallback (Llama 2, Mistral,
  Gemma, Phi-3): tokens, types (``<0xNN>`` bytes, control, user-defined) and scores. llama.cpp merges
  the adjacent pair whose result has the highest score; HF merges the pair of lowest merge rank,
  so a token's score is minus the rank of the first merge that produces it, and llama.cpp follows
  the tokenizer.json it was exported from.

The pre-tokenizer name (``tokenizer.ggml.pre``) is read off the structure of ``tokenizer.json`` (see
:data:`PRE_TOKENIZERS`), not off a hash of sample tokenizations as llama.cpp's converter does; a
structure not in the table raises :class:`ModelError` rather than letting llama.cpp fall back to a
default that tokenizes differently from transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from ...errors import ModelError
from ...loading import read_json

# The regexes of Split pre-tokenizers, as tokenizer.json spells them.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp pre-tokenizer name → (normalizer type or None, the tokenizer.json pre-tokenizer that
# splits text the same way, reduced by _pre_tokenizer_signature to the fields that change the split).
# "smollm" is llama.cpp's \p{N} split followed by the GPT-2 regex, i.e. Digits(individual) then
# ByteLevel(use_regex). llama.cpp's starcoder/refact/... types split identically; "smollm" is the
# one llama.cpp's converter writes for SmolLM2 and it also keeps clean_spaces off, which matches
# transformers' decoding of these byte-level tokenizers. "gpt-2" is ByteLevel's own regex alone.
# "qwen2": llama.cpp does not apply Qwen's NFC normalizer; text already in NFC (most text) splits
# the same.
PRE_TOKENIZERS: dict[str, tuple[str | None, tuple[tuple[Any, ...], ...]]] = {
    "smollm": (None, (("Digits", True), ("ByteLevel", False, True))),
    "gpt-2": (None, (("ByteLevel", False, True),)),
    "llama-bpe": (None, (("Split", LLAMA3_REGEX, "Isolated", False), ("ByteLevel", False, False))),
    "qwen2": ("NFC", (("Split", QWEN2_REGEX, "Isolated", False), ("ByteLevel", False, False))),
}


def read_tokenizer_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "tokenizer.json"
    try:
        return read_json(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; GGUF export needs a fast (tokenizer.json) tokenizer") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read ({e})") from None


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
    if node.get("type") == "Split" and set(node.get("pattern") or {}) == {"Regex"}:
        return (("Split", node["pattern"]["Regex"], node.get("behavior"), node.get("invert")),)
    return ((node.get("type"), json.dumps(node, sort_keys=True)),)


SPACE = "\u2581"  # "▁", SentencePiece's escaped space


def _steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A normalizer/pre-tokenizer/decoder node as the flat list of its steps."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get(key, []) for step in _steps(child, key)]
    return [node]


def vocab_kind(model_dir: Path, tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.model`` for this tokenizer: "gpt2" or "llama", else ModelError."""
    model = tokenizer_json.get("model") or {}
    decoders = {step.get("type") for step in _steps(tokenizer_json.get("decoder"), "decoders")}
    if model.get("type") == "BPE" and decoders == {"ByteLevel"}:
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback") and "ByteFallback" in decoders:
        return "llama"
    raise ModelError(
        f"{model_dir}/tokenizer.json: tokenizer model {model.get('type')} with decoders {sorted(map(str, decoders))} "
        "is not supported; expected byte-level BPE (gpt2) or SentencePiece-style BPE with byte fallback (llama)"
    )


def add_space_prefix(model_dir: Path, tokenizer_json: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer puts ``▁`` before the text (llama.cpp's add_space_prefix).

    Llama 2 and Mistral do (a ``Metaspace`` pre-tokenizer that prepends, or a ``Prepend`` normalizer);
    Gemma does not (its normalizer only replaces spaces). Anything else is not recognised.
    """
    normalizers = _steps(tokenizer_json.get("normalizer"), "normalizers")
    pre = _steps(tokenizer_json.get("pre_tokenizer"), "pretokenizers")
    replaces_spaces = escapes_spaces_first(tokenizer_json)
    prepends = any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in normalizers)
    if replaces_spaces and len(normalizers) == 1 + prepends and all(map(_splits_on_space, pre)):
        return prepends
    if (
        not normalizers
        and len(pre) == 1
        and pre[0].get("type") == "Metaspace"
        and pre[0].get("replacement") == SPACE
        and pre[0].get("prepend_scheme") in ("first", "always")
        and not pre[0].get("split", True)
    ):
        return True
    raise ModelError(
        f"{model_dir}/tokenizer.json: unrecognised SentencePiece-style whitespace handling "
        f"(normalizer {tokenizer_json.get('normalizer')}, pre_tokenizer {tokenizer_json.get('pre_tokenizer')}); "
        "expected a Metaspace pre-tokenizer or a Replace(' ', '▁') normalizer"
    )


def _splits_on_space(step: dict[str, Any]) -> bool:
    """Gemma's Split(" ") pre-tokenizer: a no-op once the normalizer has turned spaces into ``▁``."""
    return step.get("type") == "Split" and step.get("pattern") == {"String": " "}


def escapes_spaces_first(tokenizer_json: dict[str, Any]) -> bool:
    """Whether the normalizer turns spaces into ``▁`` (Gemma, legacy Llama 2): added tokens marked
    ``normalized`` are then matched against ``▁``-escaped text."""
    return any(
        n.get("type") == "Replace" and n.get("pattern") == {"String": " "} and n.get("content") == SPACE
        for n in _steps(tokenizer_json.get("normalizer"), "normalizers")
    )


def pre_tokenizer_name(model_dir: Path, tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre``: "default" for SentencePiece-style tokenizers, the
    matching :data:`PRE_TOKENIZERS` name for byte-level BPE, or ModelError."""
    if vocab_kind(model_dir, tokenizer_json) == "llama":
        add_space_prefix(model_dir, tokenizer_json)  # refuses whitespace handling it cannot express
        return "default"
    signature = _pre_tokenizer_signature(tokenizer_json.get("pre_tokenizer"))
    normalizer = tokenizer_json.get("normalizer")
    normalizer_type = normalizer.get("type") if isinstance(normalizer, dict) else None
    for name, (known_normalizer, known) in PRE_TOKENIZERS.items():
        if signature == known and normalizer_type == known_normalizer:
            return name
    raise ModelError(
        f"{model_dir}/tokenizer.json: unrecognised pre-tokenizer {signature} "
        f"(normalizer {normalizer}); known llama.cpp pre-tokenizers: {', '.join(PRE_TOKENIZERS)}"
    )


def add_tokenizer(
    writer: gguf.GGUFWriter,
    model_dir: Path,
    config: dict[str, Any],
    tokenizer_json: dict[str, Any],
    pre: str,
) -> None:
    """Write tokenizer metadata the way llama.cpp's converter does (see the module docstring)."""
    vocab_size = config["vocab_size"]
    kind = vocab_kind(model_dir, tokenizer_json)
    id_to_token = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    added = {a["id"]: a for a in tokenizer_json.get("added_tokens", [])}
    id_to_token.update({i: a["content"] for i, a in added.items()})
    if max(id_to_token) >= vocab_size:
        raise ModelError(
            f"{model_dir}/tokenizer.json: token id {max(id_to_token)} does not fit config.json vocab_size {vocab_size}"
        )
    unk = tokenizer_json["model"].get("unk_token")
    # llama.cpp matches user-defined tokens in the raw text; transformers matches a "normalized"
    # added token in the normalized text, where spaces are already "▁". Unescape those.
    unescape = kind == "llama" and escapes_spaces_first(tokenizer_json)
    for i, a in added.items():
        if unescape and a.get("normalized") and not _is_control(a):
            id_to_token[i] = a["content"].replace(SPACE, " ")

    tokens: list[str] = []
    types: list[gguf.TokenType] = []
    for i in range(vocab_size):
        token = id_to_token.get(i)
        if token is None:  # embedding rows with no token (vocab padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if kind == "llama" and token == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if _is_control(added[i]) else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and _is_byte_token(token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)

    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(_merge_scores(tokenizer_json, tokens))
        writer.add_add_space_prefix(add_space_prefix(model_dir, tokenizer_json))
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=vocab_size)
    # SpecialVocab only learns add_bos from a post-processor that prepends BOS; when there is none,
    # transformers adds no BOS, so say so explicitly instead of leaving llama.cpp to guess.
    special.add_special_token.setdefault("bos", False)
    special.add_to_gguf(writer, quiet=True)


def _is_byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _merge_scores(tokenizer_json: dict[str, Any], tokens: list[str]) -> list[float]:
    """Minus the rank of the first merge that makes each token (0 for tokens no merge makes)."""
    rank_of: dict[str, int] = {}
    for rank, merge in enumerate(tokenizer_json["model"].get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank_of.setdefault(left + right, rank)
    return [-float(rank_of.get(token, 0)) for token in tokens]


def _is_control(added_token: dict[str, Any]) -> bool:
    """Added tokens that llama.cpp must treat as control tokens (never produced from plain text).

    Besides tokens flagged special, llama.cpp's converter also treats ``<|...|>`` tokens as control
    because some tokenizers forget the flag.
    """
    content = added_token["content"]
    return bool(added_token.get("special")) or (content.startswith("<|") and content.endswith("|>"))
