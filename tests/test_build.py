"""`edgeft build` end to end on the real SmolLM2 through llama.cpp, with a short training run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"
REPORT_KEYS = {
    "artifact": {"path", "format", "quant", "size_bytes", "sha256"},
    "reference": {"path", "size_bytes"},
    "fidelity": {"perplexity_reference", "perplexity_artifact", "perplexity_delta_pct", "kl_divergence_mean",
                 "top1_agreement", "task_accuracy_base", "task_accuracy_reference", "task_accuracy_artifact"},
    "latency": {"threads", "decode_tok_s", "reference_decode_tok_s"},
}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build")
    cfg = root / "edgeft.toml"
    cfg.write_text(
        f'model = "smollm2-135m"\n'
        f'[data]\ntrain = "{COOKING / "train.jsonl"}"\neval = "{COOKING / "eval.jsonl"}"\n'
        "[train]\nmax_steps = 2\nbatch_size = 4\nmax_seq_len = 96\n"
        "[bench]\nthreads = 2\nmax_eval = 6\nmax_new_tokens = 24\ndecode_tokens = 8\nrepeats = 1\n"
        "[gates]\nmax_size_mb = 500\n"
    )
    return cfg


def run_build(cfg: Path, out: Path, target: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edgeft.cli", "build", "--config", str(cfg), "--target", target, "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


def stages(out: Path) -> dict[str, bool]:
    return {s["stage"]: s["cached"] for s in json.loads((out / "report.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def first_build(config, tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("out") / "demo"
    proc = run_build(config, out, "gguf-q8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_report_has_the_contract_keys(first_build):
    report = json.loads((first_build / "report.json").read_text())
    assert report["target"] == "gguf-q8" and report["passed"] is True
    for section, keys in REPORT_KEYS.items():
        assert keys <= set(report[section]), (section, keys - set(report[section]))
    art, fid = report["artifact"], report["fidelity"]
    assert art["format"] == "gguf" and art["quant"] == "Q8_0" and "Q8_0" in art["tensor_types"]
    assert Path(art["path"]).is_file() and art["size_bytes"] == Path(art["path"]).stat().st_size
    assert 0 <= fid["kl_divergence_mean"] < 0.05 and fid["top1_agreement"] > 0.9  # Q8_0 is near-lossless
    assert abs(fid["perplexity_delta_pct"]) < 5
    assert all(0 <= fid[k] <= 1 for k in ("task_accuracy_base", "task_accuracy_reference", "task_accuracy_artifact"))
    assert report["latency"]["threads"] == 2 and report["latency"]["decode_tok_s"] > 0
    assert (first_build / "report.md").read_text().startswith("# edgeft report")
    assert set(stages(first_build)) == {"model", "train", "merge", "export", "quantize", "bench"}


def test_second_build_is_a_cache_hit(config, first_build):
    before = {p: p.stat().st_mtime_ns for p in first_build.rglob("model.gguf")}
    proc = run_build(config, first_build, "gguf-q8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(stages(first_build).values()), stages(first_build)
    assert before == {p: p.stat().st_mtime_ns for p in first_build.rglob("model.gguf")}


def test_new_target_reruns_only_quantize_and_bench(config, first_build):
    proc = run_build(config, first_build, "gguf-q4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stages(first_build) == {"model": True, "train": True, "merge": True, "export": True,
                                   "quantize": False, "bench": False}
    report = json.loads((first_build / "report.json").read_text())
    # SmolLM2's 576-wide rows are not 256-multiples: llama.cpp's Q4_K_M mix is mostly Q5_0 here.
    types = report["artifact"]["tensor_types"]
    assert max(types, key=types.get) == "Q5_0" and {"Q4_K", "Q6_K"} & set(types)


def test_failing_gate_exits_1_and_names_it(config, first_build, tmp_path):
    strict = tmp_path / "strict.toml"
    strict.write_text(config.read_text().replace("max_size_mb = 500", "max_size_mb = 1"))
    proc = run_build(strict, first_build, "gguf-q8")
    assert proc.returncode == 1
    assert "gate failed: max_size_mb" in proc.stderr
    assert json.loads((first_build / "report.json").read_text())["passed"] is False
