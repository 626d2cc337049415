"""A QLoRA build end to end on a tiny llama: the merge strategy `auto` chose and the report says so; the
adapter on its NF4 base joins the fidelity ladder; the loss curve lands beside the report."""

from __future__ import annotations

import json

import pytest

from .cli import run_edgeft
from .tiny import tiny_build_config

pytestmark = pytest.mark.slow  # every test here builds or runs a model end to end


def test_a_qlora_build_reports_the_merge_it_kept_the_adapter_on_nf4_row_and_the_loss_curve(tmp_path, tokenizer):
    cfg = tiny_build_config(
        tmp_path,
        tokenizer,
        'method = "qlora"\nmax_steps = 4\nbatch_size = 4\nmax_seq_len = 64\nrank = 4\nprecision = "fp32"\n'
        '[merge]\nstrategy = "auto"\n',
        train_rows=16,
    )
    out = tmp_path / "build"
    proc = run_edgeft(["build", "--config", cfg, "--target", "gguf-q8", "--out", out], timeout=900)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: a gate on a random tiny model may fail
    # library chatter stays off the user's terminal: peft's calls to transformers' deprecated names,
    # bitsandbytes' and `kernels`' notices about a hub-fetched CPU kernel edgeft never fetches
    for chatter in ("Warning", "kernels-community"):
        assert chatter not in proc.stderr, proc.stderr[-3000:]

    adapter = json.loads((out / "adapter" / "manifest.json").read_text())
    assert adapter["params"]["method"] == "qlora" and adapter["results"]["compute_dtype"] == "float32"
    report = json.loads((out / "report.json").read_text())
    kld = report["merge"]["kld_vs_adapter_on_nf4_base"]
    assert set(kld) == {"fp", "dequant"} and report["merge"]["strategy"] == min(kld, key=kld.get)
    assert report["merge"] == json.loads((out / "merged" / "manifest.json").read_text())["results"]
    md = (out / "report.md").read_text()
    assert f"QLoRA merge: `{report['merge']['strategy']}` kept" in md and "`fp`" in md and "`dequant`" in md

    # The adapter on its NF4 base: a ladder row of its own, measured against the reference (the merge).
    rows = {r["stage"]: r for r in report["ladder"]}
    nf4 = rows["adapter on NF4 base"]
    assert nf4["runtime"] == "torch" and nf4["quant"] == "nf4"
    assert [r["stage"] for r in report["ladder"]][:3] == ["base", "adapter on NF4 base", "reference"]
    stage = json.loads((out / "bench-adapter-nf4" / "manifest.json").read_text())
    assert stage["results"]["compute_dtype"] == "float32" and len(stage["results"]["answers"]) == 3
    assert nf4["kl_divergence_mean"] == stage["results"]["fidelity"]["kl_divergence_mean"]
    assert 0 <= nf4["top1_agreement"] <= 1 and nf4["task_accuracy_artifact"] in (0, 1 / 3, 2 / 3, 1)
    # the kept merge computes what the adapter on NF4 computes (up to fp32 rounding): both near the reference
    if report["merge"]["strategy"] == "dequant":
        assert nf4["kl_divergence_mean"] < 1e-3 and nf4["top1_agreement"] > 0.95
    assert "| adapter on NF4 base | torch | nf4 |" in md

    # Training: histories in the report, the curve beside it, linked from report.md.
    training = report["training"]
    assert training["eval_loss_history"] == adapter["results"]["eval_loss_history"] != []
    assert training["train_loss_history"] == adapter["results"]["train_loss_history"] != []
    assert training["best_step"] == min(training["eval_loss_history"], key=lambda e: e["loss"])["step"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![train and validation loss](loss.png)" in md
