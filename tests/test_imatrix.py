"""Importance matrices: measured on a calibration set, saved in llama.cpp's GGUF layout, passed to
llama.cpp's quantizer through its C API, recorded in the artifact; on a tiny llama (real tokenizer)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import ConfigError, ModelError

from .cores import THREADS
from .tiny import make_tiny_llama

COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def outlier_llama(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny llama with a few loud input channels, as trained LLMs have (outlier features): the case
    where weighting rounding error by activation size matters. Its F32 GGUF beside it."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.formats.gguf.export import export

    root = tmp_path_factory.mktemp("imat")
    hf = make_tiny_llama(root / "hf", tokenizer, hidden=256, intermediate=512, heads=4, kv_heads=2)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):  # the norms feed every linear layer's input columns
                p.copy_(torch.exp(0.8 * torch.randn(p.shape, generator=gen)))
                p[torch.randperm(p.numel(), generator=gen)[:8]] *= 8.0
    model.save_pretrained(hf)
    return {"hf": hf, "f32": export(hf, root / "f32", "f32").path}


@pytest.fixture(scope="module")
def task_set(tokenizer):
    from edgeft.calibration import build_set

    return build_set("task", tokenizer, COOKING / "train.jsonl", tokens=4096, chunk_tokens=128, task_share=0.5)


def test_calibration_sets_are_deterministic_and_hashed(tokenizer, task_set):
    from edgeft.calibration import build_set

    again = build_set("task", tokenizer, COOKING / "train.jsonl", tokens=4096, chunk_tokens=128, task_share=0.5)
    assert task_set.chunks.shape == (32, 128) and again.sha256 == task_set.sha256
    general = build_set("general", tokenizer, None, tokens=4096, chunk_tokens=128, task_share=0.5)
    mix = build_set("mix", tokenizer, COOKING / "train.jsonl", tokens=4096, chunk_tokens=128, task_share=0.25)
    assert len({task_set.sha256, general.sha256, mix.sha256}) == 3
    assert mix.recipe["chunks_taken"] == {"task": 8, "general": 24}
    # the mix is the task set's first chunks followed by the general set's
    assert (mix.chunks[:8] == task_set.chunks[:8]).all() and (mix.chunks[8:] == general.chunks[:24]).all()
    assert general.recipe["general_text_sha256"] == _sha(Path("calibration/general.txt").resolve())


def test_calibration_errors_name_the_setting(tokenizer, tmp_path):
    from edgeft.calibration import build_set

    with pytest.raises(ConfigError, match="needs the training data"):
        build_set("task", tokenizer, None, tokens=512, chunk_tokens=128, task_share=0.5)
    with pytest.raises(ConfigError, match="imatrix: expected one of task, general, mix"):
        build_set("wiki", tokenizer, None, tokens=512, chunk_tokens=128, task_share=0.5)
    with pytest.raises(ConfigError, match=r"fewer than one chunk of 2048 \(\[calibration\].chunk_tokens\)"):
        one = tmp_path / "one.jsonl"
        one.write_text((COOKING / "train.jsonl").read_text().splitlines()[0] + "\n")
        build_set("task", tokenizer, one, tokens=1 << 20, chunk_tokens=2048, task_share=0.5)


@pytest.mark.slow
def test_imatrix_holds_every_linear_input_with_its_token_count(outlier_llama, task_set, tmp_path):
    from edgeft.formats.gguf import imatrix as im
    from edgeft.formats.gguf.inspect import read_gguf

    stats = im.collect(outlier_llama["hf"], outlier_llama["f32"] / "model.gguf", task_set.chunks, threads=THREADS)
    per_layer = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    assert set(stats) == {f"blk.{i}.{t}.weight" for i in range(2) for t in per_layer}
    tokens = task_set.chunks.size
    assert all(count == tokens for _, count in stats.values())
    assert stats["blk.0.ffn_down.weight"][0].shape == (512,) and stats["blk.0.attn_q.weight"][0].shape == (256,)
    # q, k and v read the same normed hidden state
    np.testing.assert_allclose(stats["blk.1.attn_q.weight"][0], stats["blk.1.attn_v.weight"][0])
    im.write(tmp_path / "imatrix.gguf", stats, "test", *task_set.chunks.shape)
    back = im.read(tmp_path / "imatrix.gguf")
    assert set(back) == set(stats)
    np.testing.assert_allclose(back["blk.0.ffn_up.weight"], stats["blk.0.ffn_up.weight"][0] / tokens, rtol=1e-6)
    # llama.cpp's own layout: general.type, datasets, chunk count and size
    r = read_gguf(tmp_path / "imatrix.gguf")
    assert r.get_field("general.type").contents() == "imatrix"
    assert r.get_field("imatrix.chunk_count").contents() == 32 and r.get_field("imatrix.chunk_size").contents() == 128
    assert {t.name for t in r.tensors} >= {"blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts"}


def _mean_kld(ref_file: Path, q_file: Path, token_lists: list[list[int]]) -> float:
    from edgeft.runtimes.llamacpp import LlamaCppRuntime

    def logp(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ref, q = LlamaCppRuntime(ref_file, n_threads=THREADS), LlamaCppRuntime(q_file, n_threads=THREADS)
    try:
        klds = []
        for tokens in token_lists:
            p, lq = logp(ref.logits(tokens).astype(np.float64)), logp(q.logits(tokens).astype(np.float64))
            klds.append((np.exp(p) * (p - lq)).sum(-1))
        return float(np.concatenate(klds).mean())
    finally:
        ref.close()
        q.close()


@pytest.mark.slow
def test_imatrix_changes_the_weights_lowers_held_out_kld_and_is_recorded(outlier_llama, task_set, tokenizer, tmp_path):
    from edgeft.data import load_jsonl
    from edgeft.formats.gguf.imatrix import imatrix_stage
    from edgeft.formats.gguf.inspect import read_gguf
    from edgeft.formats.gguf.quantize import quantize

    imat = imatrix_stage(
        outlier_llama["hf"], outlier_llama["f32"], tmp_path / "imatrix-task", task_set, threads=THREADS
    )
    plain = quantize(outlier_llama["f32"], tmp_path / "q4_0", "Q4_0", threads=THREADS)
    weighted = quantize(outlier_llama["f32"], tmp_path / "q4_0-imat", "Q4_0", threads=THREADS, imatrix_dir=imat.path)
    a, b = read_gguf(plain.path / "model.gguf"), read_gguf(weighted.path / "model.gguf")
    qa = {t.name: bytes(t.data) for t in a.tensors}
    qb = {t.name: bytes(t.data) for t in b.tensors}
    assert qa["blk.0.ffn_down.weight"] != qb["blk.0.ffn_down.weight"]  # the matrix moved the rounding
    assert qa["blk.0.attn_norm.weight"] == qb["blk.0.attn_norm.weight"]  # norms stay F32, untouched
    # held-out: the eval conversations, which calibration never saw
    held_out = [
        tokenizer.apply_chat_template(ex.messages, tokenize=True, return_dict=False)
        for ex in load_jsonl(COOKING / "eval.jsonl")[:12]
    ]
    held_out = [list(t["input_ids"] if hasattr(t, "keys") else t) for t in held_out]
    f32 = outlier_llama["f32"] / "model.gguf"
    kld_plain = _mean_kld(f32, plain.path / "model.gguf", held_out)
    kld_imat = _mean_kld(f32, weighted.path / "model.gguf", held_out)
    assert kld_imat < 0.9 * kld_plain, (kld_imat, kld_plain)
    # what was used is in the file's header and the manifest
    meta = {f: b.get_field(f).contents() for f in b.fields if f.startswith(("edgeft.", "quantize."))}
    assert meta["edgeft.imatrix.sha256"] == _sha(imat.path / "imatrix.gguf")
    assert meta["edgeft.calibration.sha256"] == task_set.sha256
    assert meta["quantize.imatrix.entries_count"] == 14
    results = weighted.manifest["results"]
    assert results["imatrix_sha256"] == meta["edgeft.imatrix.sha256"]
    assert results["calibration_sha256"] == task_set.sha256
    assert json.loads((imat.path / "manifest.json").read_text())["results"]["calibration"]["source"] == "task"


@pytest.mark.slow
def test_same_inputs_give_a_byte_identical_gguf(outlier_llama, task_set, tmp_path):
    from edgeft.formats.gguf.imatrix import imatrix_stage
    from edgeft.formats.gguf.quantize import quantize

    files = []
    for run in ("a", "b"):
        imat = imatrix_stage(
            outlier_llama["hf"], outlier_llama["f32"], tmp_path / run / "imatrix", task_set, threads=THREADS
        )
        q = quantize(outlier_llama["f32"], tmp_path / run / "q", "Q4_K_M", threads=THREADS, imatrix_dir=imat.path)
        files.append((_sha(imat.path / "imatrix.gguf"), _sha(q.path / "model.gguf")))
    assert files[0] == files[1]


@pytest.mark.slow
def test_malformed_or_mismatched_imatrix_is_refused(outlier_llama, tokenizer, tmp_path):
    from edgeft.calibration import build_set
    from edgeft.formats.gguf import imatrix as im
    from edgeft.formats.gguf.export import export
    from edgeft.formats.gguf.quantize import quantize

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "imatrix.gguf").write_bytes(b"GGUF" + b"\0" * 40)
    with pytest.raises(ModelError, match="imatrix.gguf"):
        quantize(outlier_llama["f32"], tmp_path / "q-bad", "Q4_0", imatrix_dir=bad)
    # a matrix measured on another model (other widths) names the first entry that does not fit
    other_hf = make_tiny_llama(tmp_path / "other", tokenizer, hidden=64, intermediate=128)
    other_f32 = export(other_hf, tmp_path / "other-f32", "f32").path
    calib = build_set("general", tokenizer, None, tokens=256, chunk_tokens=128, task_share=0.5)
    other = im.imatrix_stage(other_hf, other_f32, tmp_path / "imatrix-other", calib, threads=THREADS)
    with pytest.raises(ModelError, match=r"blk\.0\.attn_k\.weight has 64 values, the tensor 256 columns"):
        quantize(outlier_llama["f32"], tmp_path / "q-other", "Q4_0", imatrix_dir=other.path)
    assert not (tmp_path / "q-bad").exists() and not (tmp_path / "q-other").exists()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('quant = "Q4_K_M"\nimatrix = "wiki"\n', "x.toml: imatrix: expected one of task, general, mix, got 'wiki'"),
        ('quant = "F16"\nimatrix = "task"\n', "x.toml: imatrix: F16 is not quantized"),
    ],
)
def test_imatrix_target_field_is_checked(tmp_path, monkeypatch, body, message):
    from edgeft.targets import get_target

    monkeypatch.setenv("EDGEFT_TARGETS", str(tmp_path))
    (tmp_path / "x.toml").write_text('format = "gguf"\n' + body)
    with pytest.raises(ConfigError, match=message):
        get_target("x")


@pytest.mark.slow
def test_k_quant_mixes_weigh_only_their_k_quant_rows(tokenizer, tmp_path):
    """Rows narrower than a 256-value K-quant block fall back to a legacy type in a K-quant mix; on
    SmolLM2 the matrix made those worse (see imatrix.scope), so they get none. Legacy types get it all."""
    from edgeft.formats.gguf import imatrix as im
    from edgeft.formats.gguf.export import export
    from edgeft.formats.gguf.inspect import read_gguf

    hf = make_tiny_llama(tmp_path / "hf", tokenizer, hidden=64, intermediate=256)
    f32 = export(hf, tmp_path / "f32", "f32").path / "model.gguf"
    linear = {
        t.name: int(t.shape[0]) for t in read_gguf(f32).tensors if t.name.startswith("blk.") and len(t.shape) == 2
    }
    matrix = {name: np.ones(width, dtype=np.float32) for name, width in linear.items()}
    kept, rule = im.scope(matrix, f32, "Q4_K_M")
    assert set(kept) == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"} and "256" in rule
    assert im.scope(matrix, f32, "Q4_0") == (matrix, "all")
