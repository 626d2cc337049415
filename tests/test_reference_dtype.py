"""The reference computed in bf16 where its fp32 copy would not fit: the torch runtime loads in that
dtype and hands back fp32 logits, the stored reference and its stage key say which, and the report
says which and why. How far bf16 moves a reference from fp32 is measured here on a tiny model (and on
SmolLM2-135M in docs/report.md)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgeft.config import BenchConfig
from edgeft.errors import ConfigError
from edgeft.resources import ReferenceDtype

from .cli import run_edgeft
from .tiny import COOKING, make_tiny_llama

# (stage, dtype) → bounds on the bf16 torch model against the stored fp32 reference of the same tiny
# llama (2 layers of 64, std 0.2), 3 questions, 57 reply tokens; measured: mean KLD 3.5e-5, top-1 94.7%
# (one token of 57 flipped). Nonzero: the dtype was applied.
TOLERANCES = {("reference", "bf16"): {"mean_kld_above": 1e-7, "mean_kld_below": 1e-3, "top1_at_least": 0.85}}

BENCH = BenchConfig(threads=1, max_new_tokens=4, prompt_tokens=64, decode_tokens=4, repeats=1, top_k=8, golden=1)
BF16 = ReferenceDtype("bfloat16", "fp32 would need 0.9 GB, this machine has 0.5 GB")


@pytest.fixture(scope="module")
def refs(tmp_path_factory, tokenizer) -> dict:
    """A tiny llama, three held-out questions, and its stored references in fp32 and in bf16."""
    from edgeft.bench.run import reference

    root = tmp_path_factory.mktemp("ref16")
    model = make_tiny_llama(root / "model", tokenizer)
    eval_file = root / "eval.jsonl"
    eval_file.write_text("".join((COOKING / "eval.jsonl").read_text().splitlines(keepends=True)[:3]))
    fp32 = reference(model, eval_file, root / "ref-fp32", BENCH)
    bf16 = reference(model, eval_file, root / "ref-bf16", BENCH, dtype=BF16)
    return {"root": root, "model": model, "eval": eval_file, "fp32": fp32, "bf16": bf16}


@pytest.mark.slow
def test_the_torch_runtime_loads_bf16_and_hands_back_fp32_logits(refs) -> None:
    import torch

    from edgeft.runtimes import load_runtime
    from edgeft.runtimes.torch import TorchRuntime

    rt = load_runtime("torch", refs["model"], threads=1, dtype="bfloat16")
    assert {p.dtype for p in rt.model.parameters()} == {torch.bfloat16}
    logits = rt.logits(rt.tokenize("Safe temperature for chicken?"))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    rt.close()
    with pytest.raises(ConfigError, match="torch dtype 'float16': expected one of float32, bfloat16"):
        TorchRuntime(refs["model"], threads=1, dtype="float16")
    with pytest.raises(ConfigError, match="--dtype applies to torch only"):
        load_runtime("llama.cpp", refs["model"], threads=1, dtype="bfloat16")


def test_a_bf16_reference_records_its_dtype_and_stays_close_to_fp32(refs) -> None:
    from edgeft.bench import reference as stored_reference
    from edgeft.bench.fidelity import compare_stored
    from edgeft.runtimes.torch import TorchRuntime

    fp32, bf16 = (stored_reference.load(refs[d].path).meta for d in ("fp32", "bf16"))
    assert fp32["dtype"] == "float32" and "dtype_reason" not in fp32
    assert bf16["dtype"] == "bfloat16" and bf16["dtype_reason"] == BF16.why
    assert bf16["performance"]["dtype"] == "bfloat16"  # its speed was timed in bf16 too
    assert refs["bf16"].manifest["results"]["dtype"] == "bfloat16"

    # the bf16 model scored against the stored fp32 reference, as an artifact would be
    rt = TorchRuntime(refs["model"], threads=1, dtype="bfloat16")
    fidelity = compare_stored(stored_reference.load(refs["fp32"].path), rt)
    rt.close()
    bounds = TOLERANCES["reference", "bf16"]
    assert bounds["mean_kld_above"] < fidelity["kl_divergence_mean"] < bounds["mean_kld_below"], fidelity
    assert fidelity["top1_agreement"] >= bounds["top1_at_least"]


@pytest.mark.slow
def test_the_reference_stage_never_reuses_one_dtype_for_the_other(refs) -> None:
    from edgeft.bench import reference as stored_reference
    from edgeft.bench.run import _params, reference

    fp32, bf16 = refs["fp32"].manifest, refs["bf16"].manifest
    assert fp32["key"] != bf16["key"]
    # fp32 adds nothing to the key: references cached before the option existed stay valid
    assert fp32["params"] == _params(BENCH) and bf16["params"] == {**_params(BENCH), "dtype": "bfloat16"}
    assert "reference_dtype" not in _params(BenchConfig(reference_dtype="bfloat16"))  # the resolved one counts
    swap = refs["root"] / "ref-swap"
    shutil.copytree(refs["fp32"].path, swap)
    again = reference(refs["model"], refs["eval"], swap, BENCH, dtype=BF16)
    assert not again.cached and stored_reference.load(swap).meta["dtype"] == "bfloat16"
    assert reference(refs["model"], refs["eval"], swap, BENCH, dtype=BF16).cached


def test_auto_picks_bf16_for_an_hf_reference_that_would_not_fit_in_fp32(refs, monkeypatch) -> None:
    """`edgeft bench --reference HF_FOLDER` has no build plan: the same rule, on the folder's headers."""
    from edgeft.resources import machine_reference_dtype

    monkeypatch.setenv("EDGEFT_RAM_BYTES", str(10**9))  # 0.9 GB usable: the interpreter alone is 0.9
    chosen = machine_reference_dtype(refs["model"], "auto")
    assert chosen.name == "bfloat16" and chosen.why == "fp32 would need 0.9 GB, this machine has 1.0 GB"
    monkeypatch.setenv("EDGEFT_RAM_BYTES", str(10**10))
    assert machine_reference_dtype(refs["model"], "auto") == ReferenceDtype()
    assert machine_reference_dtype(refs["model"], "float32") == ReferenceDtype()


@pytest.mark.slow
def test_the_report_says_bf16_wherever_it_said_fp32_and_why(refs) -> None:
    """A build folder whose reference and base row ran in bf16, benched through the CLI."""
    from edgeft.bench.run import bench_base
    from edgeft.formats.gguf.export import export

    build = refs["root"] / "build"
    build.mkdir()
    shutil.copytree(refs["bf16"].path, build / "reference")
    base = bench_base(refs["model"], build / "reference", build / "bench-base", BENCH, dtype=BF16)
    assert base.manifest["results"]["dtype"] == "bfloat16" and base.manifest["params"]["dtype"] == "bfloat16"
    export(refs["model"], build / "gguf-f16", "f16")
    (refs["root"] / "bench.toml").write_text(
        "[bench]\nthreads = 1\nmax_new_tokens = 4\nprompt_tokens = 64\ndecode_tokens = 4\nrepeats = 1\ntop_k = 8\n"
    )
    run = run_edgeft(
        ["bench", "--build", str(build), "--config", str(refs["root"] / "bench.toml"), "--out", "out"], refs["root"]
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((refs["root"] / "out" / "report.json").read_text())
    assert report["reference"]["dtype"] == "bfloat16" and report["reference"]["dtype_reason"] == BF16.why
    types = {r["stage"]: r["quant"] for r in report["ladder"]}
    assert types["reference"] == "bf16" and types["base"] == "bf16" and types["gguf-f16"] == "F16"
    md = (refs["root"] / "out" / "report.md").read_text()
    assert f"**Reference computed in bf16** ({BF16.why})" in md
    assert "MB fp32, computed in bf16)" in md  # the folder's weights are fp32; the passes were bf16
    assert "each stage vs the fine-tuned bf16 reference" in md
    assert "| × bf16 |" in md and "| reference bf16 |" in md and "fp32 reference" not in md
    assert "vs fine-tuned bf16 reference" in run.stdout
