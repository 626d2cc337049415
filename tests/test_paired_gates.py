"""Verdicts on intervals, through the real CLI, llama.cpp and torch, on a tiny llama.

The held-out questions are made from the tiny reference's own greedy replies: on 40 of them the
accepted answer is the first word the reference says (so it is right there by construction), on 20
an answer nobody says (everyone is wrong there). An F16 GGUF of the model then differs from the
reference by rounding noise (a flip or two), a Q2_K GGUF is damaged (almost every answer lost). The
interval gate must pass the first and fail the second; `--compare-to` must pair the two reports by
question and by sequence and call the damage a regression.

Two `edgeft bench` runs with their latency probes: about a minute and a half on 2 busy cores, hence
the ``integration`` marker (the statistics themselves are unit-tested in test_stats.py and
test_fidelity.py).
"""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET

import pytest

from .cli import run_edgeft
from .tiny import COOKING, TINY_BENCH, make_tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RIGHT, WRONG = 40, 20
NEVER = "no such answer anywhere"
GATES = "[gates]\nmax_task_accuracy_drop = 0.15\nmax_flips = 3\nmin_task_accuracy_ratio = 0.5\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer) -> dict:
    from edgeft.data import load_jsonl
    from edgeft.formats.gguf.export import export
    from edgeft.formats.gguf.quantize import quantize
    from edgeft.runtimes.torch import TorchRuntime

    root = tmp_path_factory.mktemp("paired")
    hf = make_tiny_llama(root / "hf", tokenizer, hidden=256, intermediate=512)  # K-quant rows
    examples = load_jsonl(COOKING / "eval.jsonl")[: RIGHT + WRONG]
    rt = TorchRuntime(hf, threads=1)
    replies = rt.generate_batch([ex.prompt for ex in examples], 8)  # as the reference stage will ([bench])
    rt.close()
    lines = []
    for i, (ex, reply) in enumerate(zip(examples, replies)):
        words = reply.split()
        answer = words[0] if i < RIGHT and words else NEVER
        lines.append(json.dumps({"messages": ex.messages, "answers": [answer]}))
    (root / "eval.jsonl").write_text("\n".join(lines) + "\n")
    (root / "edgeft.toml").write_text(TINY_BENCH + GATES)

    # The artifacts, as folders named like targets (a report keys its rows by these names).
    (root / "gguf-f16").mkdir()
    shutil.copy(export(hf, root / "f16", "f16").path / "model.gguf", root / "gguf-f16" / "model.gguf")
    f32 = export(hf, root / "f32", "f32").path
    (root / "gguf-q2_k").mkdir()
    shutil.copy(quantize(f32, root / "q2k", "Q2_K").path / "model.gguf", root / "gguf-q2_k" / "model.gguf")

    out = root / "bench"
    proc = run_edgeft(
        [
            "bench",
            "--reference",
            str(hf),
            "--eval",
            str(root / "eval.jsonl"),
            "--config",
            str(root / "edgeft.toml"),
            "--artifact",
            str(root / "gguf-f16"),
            "--artifact",
            str(root / "gguf-q2_k"),
            "--out",
            str(out),
        ]
    )
    return {"root": root, "out": out, "proc": proc, "report": json.loads((out / "report.json").read_text())}


def test_the_interval_gate_passes_noise_and_fails_damage(setup):
    proc, report = setup["proc"], setup["report"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    noise, damaged = report["targets"]
    assert (noise["target"], noise["passed"], damaged["target"], damaged["passed"]) == (
        "gguf-f16",
        True,
        "gguf-q2_k",
        False,
    )
    assert report["fidelity"]["task_accuracy_reference"] == pytest.approx(RIGHT / (RIGHT + WRONG))

    p = noise["fidelity"]["task_accuracy_paired"]
    assert p["n"] == RIGHT + WRONG and p["right_to_wrong"] <= 3 and p["wrong_to_right"] == 0
    assert p["interval"][0] <= 0 <= p["interval"][1] and p["interval"][0] > -0.15
    q = damaged["fidelity"]["task_accuracy_paired"]
    assert q["right_to_wrong"] >= RIGHT - 5 and q["interval"][1] < 0 and q["p_value"] < 1e-6
    failed = {g["name"] for g in damaged["gates"] if not g["passed"]}
    assert failed == {"max_task_accuracy_drop", "max_flips", "min_task_accuracy_ratio"}
    failure = next(line for line in proc.stderr.splitlines() if line.startswith("edgeft: gate failed:"))
    assert "gguf-q2_k: max_task_accuracy_drop (limit 0.15, got 0.77" in failure and "gguf-f16" not in failure
    assert "95% CI" in failure and "40 went right→wrong" in failure

    # KLD and top-1 intervals over sequences tell the two apart as well
    assert noise["fidelity"]["kl_divergence_interval"][1] < damaged["fidelity"]["kl_divergence_interval"][0]
    assert len(noise["fidelity"]["per_sequence"]["positions"]) == RIGHT + WRONG
    # per-question right/wrong, keyed by question, so a later report can pair
    assert len(report["eval"]["question_ids"]) == len(set(report["eval"]["question_ids"])) == RIGHT + WRONG
    assert report["reference"]["answers_correct"] == [True] * RIGHT + [False] * WRONG
    assert all("correct" in a for a in damaged["answers"])
    table = proc.stdout.splitlines()
    assert any("Δ task [95% CI]" in line and "✓→✗ / ✗→✓" in line for line in table)
    assert any("gguf-q2_k" in line and f"{q['right_to_wrong']} / 0" in line for line in table)


def test_report_md_and_junit_show_flips_and_intervals(setup):
    report = setup["report"]
    md = (setup["out"] / "report.md").read_text()
    rows = {r["stage"]: r for r in report["ladder"]}
    assert set(rows) == {"reference", "gguf-f16", "gguf-q2_k"}
    for stage in ("gguf-f16", "gguf-q2_k"):
        p = rows[stage]["task_accuracy_paired"]
        line = next(line for line in md.splitlines() if line.startswith(f"| {stage} |"))
        assert f"| {p['right_to_wrong']} / {p['wrong_to_right']} |" in line, line
        assert re.search(r"\| [+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\] \|", line), line  # Δ task [CI]
        assert re.search(r"\d\.\d{5} \[\d\.\d{5}–\d\.\d{5}\]", line), line  # KLD [CI]
    assert "right→wrong" in md and "a real drop" in md and "Bonett–Price" in md

    suite = ET.parse(setup["out"] / "junit.xml").getroot()
    cases = {(c.get("classname"), c.get("name")): c for c in suite.iter("testcase")}
    bad = cases[("edgeft.gguf-q2_k", "max_task_accuracy_drop")].find("failure")
    assert bad is not None and "95% CI" in bad.get("message") and "right→wrong" in bad.get("message")
    good = cases[("edgeft.gguf-f16", "max_task_accuracy_drop")]
    assert good.find("failure") is None and "95% CI" in good.find("system-out").text


def test_compare_to_pairs_the_old_report_and_calls_the_damage_a_regression(setup):
    root, old = setup["root"], setup["out"] / "report.json"
    # the "same" target now holds the damaged file: what a broken quantizer change would do
    (root / "swapped" / "gguf-f16").mkdir(parents=True)
    shutil.copy(root / "gguf-q2_k" / "model.gguf", root / "swapped" / "gguf-f16" / "model.gguf")
    out = root / "again"
    proc = run_edgeft(
        [
            "bench",
            "--reference",
            str(setup["out"] / "reference"),
            "--config",
            str(root / "edgeft.toml"),
            "--gate",
            "max_task_accuracy_drop=1",
            "--gate",
            "max_flips=100",
            "--gate",
            "min_task_accuracy_ratio=0",
            "--artifact",
            str(root / "swapped" / "gguf-f16"),
            "--out",
            str(out),
            "--compare-to",
            str(old),
        ]
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["targets"][0]["passed"]  # every gate passed: only the comparison fails
    found = {r["metric"]: r for r in report["regressions"]}
    assert {"kl_divergence_mean", "top1_agreement", "task_accuracy_artifact"} <= set(found)
    assert "paired bootstrap over the 60 sequences" in found["kl_divergence_mean"]["rule"]
    assert "paired by question" in found["task_accuracy_artifact"]["rule"]
    assert not any("--compare-to" in w for w in report["warnings"])  # both reports had what pairing needs
    assert "regression in task_accuracy_artifact" in proc.stderr and "paired by question" in proc.stderr
    md = (out / "report.md").read_text()
    assert "| gguf-f16 | task_accuracy_artifact |" in md and "paired by question" in md
