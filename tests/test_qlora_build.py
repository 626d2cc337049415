"""A QLoRA build end to end on a tiny llama: the merge strategy `auto` chose, and the report says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .tiny import make_tiny_llama

COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"


def test_a_qlora_build_reports_the_merge_it_kept_and_both_klds(tmp_path, tokenizer):
    model = make_tiny_llama(tmp_path / "model", tokenizer)
    train, eval_ = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join((COOKING / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
    eval_.write_text("".join((COOKING / "eval.jsonl").read_text().splitlines(keepends=True)[:3]))
    cfg = tmp_path / "edgeft.toml"
    cfg.write_text(
        f'model = "{model}"\n[data]\ntrain = "{train}"\neval = "{eval_}"\n'
        '[train]\nmethod = "qlora"\nmax_steps = 4\nbatch_size = 4\nmax_seq_len = 64\nrank = 4\nprecision = "fp32"\n'
        '[merge]\nstrategy = "auto"\n'
        "[bench]\nthreads = 1\nmax_new_tokens = 8\nprompt_tokens = 64\ndecode_tokens = 8\nrepeats = 2\n"
        "top_k = 8\ngolden = 1\nladder_export = false\n"
    )
    out = tmp_path / "build"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeft", "build", "--config", str(cfg), "--target", "gguf-q8", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: a gate on a random tiny model may fail

    adapter = json.loads((out / "adapter" / "manifest.json").read_text())
    assert adapter["params"]["method"] == "qlora" and adapter["results"]["compute_dtype"] == "float32"
    report = json.loads((out / "report.json").read_text())
    kld = report["merge"]["kld_vs_adapter_on_nf4_base"]
    assert set(kld) == {"fp", "dequant"} and report["merge"]["strategy"] == min(kld, key=kld.get)
    assert report["merge"] == json.loads((out / "merged" / "manifest.json").read_text())["results"]
    md = (out / "report.md").read_text()
    assert f"QLoRA merge: `{report['merge']['strategy']}` kept" in md and "`fp`" in md and "`dequant`" in md
