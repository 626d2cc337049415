"""ONNX targets: the builder's folders read by onnxruntime-genai give torch's logits and tokens.

Tiny llama (real SmolLM2 tokenizer) for the mechanics; the real SmolLM2 behind the integration marker.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import ConfigError, ModelError

from .cores import THREADS
from .tiny import make_tiny_llama

pytest.importorskip("onnxruntime_genai")

COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"
# Digits, whitespace runs and a list; not a whitespace run right before a digit, which onnxruntime-genai
# splits differently from transformers (see docs/quantization.md, "Known difference").
CHAT = [{"role": "user", "content": "Roast at 425°F for 25 minutes,  then   rest 10?\n\n- Yes"}]


def kld(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    from edgeft.bench.fidelity import log_softmax

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("onnx") / "tiny", tokenizer)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    from edgeft.formats.onnx.export import export

    root = tmp_path_factory.mktemp("onnx-out")
    return {q: export(tiny_llama_dir, root / q, q, {}).path for q in ("fp32", "int4")}


@pytest.mark.slow
def test_fp32_export_gives_torch_logits(tiny_llama_dir, tiny_onnx):
    from edgeft.runtimes.onnxruntime_genai import OnnxGenaiRuntime
    from edgeft.runtimes.torch import TorchRuntime

    ref, art = TorchRuntime(tiny_llama_dir, threads=1), OnnxGenaiRuntime(tiny_onnx["fp32"], threads=1)
    ids = ref.tokenize(ref.render_chat(CHAT))
    assert art.tokenize(art.render_chat(CHAT)) == ids  # the folder's tokenizer and template
    assert kld(ref.logits(ids), art.logits(ids)) < 1e-6


def test_int4_folder_is_what_an_app_loads(tiny_onnx):
    from edgeft.formats.onnx import describe
    from edgeft.runtimes.onnxruntime_genai import OnnxGenaiRuntime

    folder = tiny_onnx["int4"]
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in folder.iterdir()
    }
    info = describe(folder)
    assert info["file_type"] == "int4" and info["tensor_types"]["MatMulNBits int4"] > 0
    assert info["bytes_per_token"] < describe(tiny_onnx["fp32"])["bytes_per_token"] / 3
    rt = OnnxGenaiRuntime(folder, threads=1)
    long = rt.generate(CHAT, 6, ignore_eos=True)
    assert long.n_tokens == 6 and not long.stopped


@pytest.mark.slow
def test_export_is_cached_by_model_and_options(tiny_llama_dir, tmp_path):
    from edgeft.formats.onnx.export import export

    first = export(tiny_llama_dir, tmp_path / "o", "int8", {"block_size": 64})
    assert not first.cached and first.manifest["results"]["builder_options"] == ["hf_token=false", "block_size=64"]
    assert export(tiny_llama_dir, tmp_path / "o", "int8", {"block_size": 64}).cached
    assert not export(tiny_llama_dir, tmp_path / "o", "int8", {"block_size": 128}).cached


def test_broken_folders_are_named(tiny_onnx, tmp_path):
    from edgeft.formats import detect_artifact

    no_config = shutil.copytree(tiny_onnx["int4"], tmp_path / "a")
    (no_config / "genai_config.json").unlink()
    with pytest.raises(ModelError, match="genai_config.json missing"):
        detect_artifact(no_config)
    no_data = shutil.copytree(tiny_onnx["int4"], tmp_path / "b")
    (no_data / "model.onnx.data").unlink()
    with pytest.raises(ModelError, match="external data file model.onnx.data missing"):
        detect_artifact(no_data)
    short = shutil.copytree(tiny_onnx["int4"], tmp_path / "c")
    data = (short / "model.onnx.data").read_bytes()
    (short / "model.onnx.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        detect_artifact(short)


@pytest.mark.slow
def test_a_model_the_builder_cannot_export_is_one_line(tiny_llama_dir, tmp_path):
    from edgeft.formats.onnx.export import write_onnx

    broken = shutil.copytree(tiny_llama_dir, tmp_path / "no-tokenizer")
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer_config.json").unlink()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelError, match="builder cannot export it") as e:
        write_onnx(broken, out, "int4", {})
    assert "\n" not in str(e.value)


def test_target_files_check_builder_options(tmp_path):
    from edgeft.targets import get_target

    path = tmp_path / "mine.toml"
    path.write_text('format = "onnx"\nquant = "int4"\nblocksize = 32\n')
    with pytest.raises(ConfigError, match="unknown key 'blocksize'.*block_size"):
        get_target(str(path))
    path.write_text('format = "onnx"\nquant = "int4"\nalgo_config = "gptq_magic"\n')
    with pytest.raises(ConfigError, match="algo_config: expected one of"):
        get_target(str(path))
    path.write_text('format = "onnx"\nquant = "int4"\nblock_size = 64\naccuracy_level = 1\n')
    assert get_target(str(path)).options == {"block_size": 64, "accuracy_level": 1}


# ------------------------------------------------------------------ the builder's memory (export glue)


def _file_hashes(folder: Path) -> dict[str, str]:
    from edgeft.stage import MANIFEST, sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST}


MIXED_PLAN = [{"match": {"name": "/model/layers.1/mlp/down_proj/MatMul"}, "type": "int8"}]


# fp32 (no quantizer); int4 with the tied embedding quantized by the Gather path; the quantizer's
# rtn path (k_quant, head int8); the default quantizer's two passes of a mixed plan
@pytest.mark.slow
@pytest.mark.parametrize(
    "quant,options,overrides",
    [("fp32", {}, None), ("int4", {}, None), ("int4", {"algo_config": "k_quant_last"}, None), ("int4", {}, MIXED_PLAN)],
    ids=["fp32", "int4-tied", "k_quant_last", "mixed-plan"],
)
def test_the_memory_glue_writes_the_builders_own_bytes(tiny_llama_dir, tiny_onnx, tmp_path, quant, options, overrides):
    from edgeft.formats.onnx.export import write_onnx

    folders = {}
    for stock in (True, False):
        if not stock and not options and not overrides:
            folders[stock] = tiny_onnx[quant]  # exported with the glue, as every export is
            continue
        folders[stock] = tmp_path / f"stock-{stock}"
        folders[stock].mkdir()
        write_onnx(tiny_llama_dir, folders[stock], quant, options, overrides=overrides, stock=stock)
    assert _file_hashes(folders[False]) == _file_hashes(folders[True])


def test_the_export_glue_was_checked_against_the_installed_builder():
    """The glue wraps two methods of the builder's Model (see export.py): a new builder version
    needs the comparisons above rerun and this version added once they pass."""
    import onnxruntime_genai

    from edgeft.formats.onnx.export import GLUE_CHECKED

    assert onnxruntime_genai.__version__ in GLUE_CHECKED


@pytest.mark.slow
def test_the_export_holds_the_largest_tensor_not_the_model(tiny_onnx, tokenizer, tmp_path):
    """A 283 MB random llama (tied, 12 layers of 512, a 100 MB embedding): the builder process's
    peak RSS stays within its baseline (the tiny model's export) + twice the largest tensor (a
    transposed copy beside its mapped pages) + the int4 weights it holds until the save + the mapped
    bytes it may read between two releases. The builder alone goes 0.71 GB over its baseline here
    (2.5 copies; measured), the glue 0.22 GB; this bound is 0.44 GB."""
    from edgeft.formats.onnx.export import RELEASE_EVERY_BYTES, write_onnx
    from edgeft.stage import read_manifest

    model = make_tiny_llama(tmp_path / "hf", tokenizer, hidden=512, intermediate=2048, layers=12, heads=8)
    baseline = read_manifest(tiny_onnx["int4"])["results"]["builder_peak_rss_bytes"]
    (out := tmp_path / "int4").mkdir()
    peak = write_onnx(model, out, "int4", {})["builder_peak_rss_bytes"]
    params = (model / "model.safetensors").stat().st_size / 4
    largest = 4 * len(tokenizer) * 512
    bound = 2 * largest + 0.625 * params + RELEASE_EVERY_BYTES + 64e6  # 64 MB: the baseline's own spread
    assert peak - baseline < bound, f"{(peak - baseline) / 1e6:.0f} MB over the baseline, bound {bound / 1e6:.0f} MB"


# ------------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2_onnx(smollm2_dir, edgeft_cache, cache_lock) -> dict[str, Path]:
    from edgeft.formats.onnx.export import export

    root = edgeft_cache / "onnx-exports"
    with cache_lock("onnx-exports"):  # test_onnx_mixed.py makes two of these too
        return {q: export(smollm2_dir, root / f"{smollm2_dir.name}-{q}", q, {}).path for q in ("fp32", "int8", "int4")}


@pytest.mark.integration
def test_smollm2_fp32_onnx_matches_torch_on_held_out_replies(smollm2_dir, smollm2_onnx):
    from edgeft.bench.fidelity import reply_sequences
    from edgeft.data import load_jsonl
    from edgeft.runtimes.onnxruntime_genai import OnnxGenaiRuntime
    from edgeft.runtimes.torch import TorchRuntime

    ref, art = TorchRuntime(smollm2_dir, threads=THREADS), OnnxGenaiRuntime(smollm2_onnx["fp32"], threads=THREADS)
    examples = load_jsonl(COOKING / "eval.jsonl")[:6]
    for seq in reply_sequences(ref.tokenizer, examples):
        assert kld(ref.logits(seq.tokens), art.logits(seq.tokens)) <= 1e-5


@pytest.mark.integration
def test_smollm2_tokenization_and_template_match_transformers(smollm2_dir, smollm2_onnx):
    from transformers import AutoTokenizer

    from edgeft.data import load_jsonl
    from edgeft.runtimes.onnxruntime_genai import OnnxGenaiRuntime

    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    art = OnnxGenaiRuntime(smollm2_onnx["int4"], threads=THREADS)
    for ex in load_jsonl(COOKING / "eval.jsonl"):
        rendered = hf.apply_chat_template(ex.messages, tokenize=False)
        assert art.tokenizer.apply_chat_template(json.dumps(ex.messages), add_generation_prompt=False) == rendered
        assert art.tokenize(rendered) == hf(rendered, add_special_tokens=False)["input_ids"]


# Short-answer chats: the base (not fine-tuned) SmolLM2 rambles past any budget on open cooking questions.
GOLDEN = [
    ("What is 2 + 2? Reply with the number only.", "4"),
    ("What is the capital of France? One word.", "Paris"),
    ("Say hello to me in one short sentence.", ""),
    ("Is water wet? Answer yes or no.", ""),
]


@pytest.mark.integration
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_smollm2_quantized_onnx_answers_and_stops(smollm2_onnx, quant):
    from edgeft.runtimes.onnxruntime_genai import OnnxGenaiRuntime

    rt = OnnxGenaiRuntime(smollm2_onnx[quant], threads=THREADS)
    for question, expected in GOLDEN:
        out = rt.generate([{"role": "user", "content": question}], 96)
        # ends on <|im_end|> from genai_config's eos ids, not on the budget, and never prints it
        assert out.stopped and 0 < out.n_tokens < 96, (question, out.text)
        assert "<|im_end|>" not in out.text and expected in out.text, (question, out.text)


@pytest.mark.slow
def test_cli_export_writes_an_onnx_target_and_quantize_points_to_it(tiny_llama_dir, tiny_onnx, tmp_path):
    from edgeft.files import sha256_file

    from .cli import run_edgeft

    proc = run_edgeft(["export", "--model", tiny_llama_dir, "--target", "onnx-int4", "--out", tmp_path / "int4"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"onnx: {tmp_path / 'int4'}"
    # the same folder as the library's export of the same model and quant
    for name in ("model.onnx", "model.onnx.data"):
        assert sha256_file(tmp_path / "int4" / name) == sha256_file(tiny_onnx["int4"] / name), name
    for argv, fragment in [
        # ONNX is quantized by the builder as it exports: quantize names the command that does it
        (["quantize", "--from", tmp_path / "int4", "--target", "onnx-int4"], "use `edgeft export --target onnx-int4`"),
        # a size budget needs a calibration set, which only a build has
        (["export", "--model", tiny_llama_dir, "--target", "onnx-int4-mixed"], "use `edgeft build`"),
        (["quantize", "--gguf", tmp_path / "int4", "--target", "gguf-q4_0-imat"], "use `edgeft build`"),
    ]:
        bad = run_edgeft([*argv, "--out", tmp_path / "bad"])
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and fragment in lines[0], bad.stderr
        assert not (tmp_path / "bad").exists()
