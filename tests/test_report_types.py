"""report.json as types: what to_json() writes is the dict the report was before it had types, key
for key and in the same order, and from_json() reads it (or an older, foreign or device's report)
back to an equal value."""

from __future__ import annotations

import json

from edgeft import __version__
from edgeft.report import BenchResult, Report, TargetEntry

SPREAD = {"median": 80.0, "min": 72.0, "max": 88.0}
MACHINE = {"cpu_model": "AMD EPYC 7B13", "cores": 2, "isa": ["AVX2"], "ram_bytes": 8 << 30, "runtime_builds": {}}
TIMED = {"run_id": "r1", "timed_at": "2026-01-01T00:00:00+00:00", "machine": MACHINE}
LAT = {
    "runtime": "llama.cpp",
    "runtime_version": "0.3.36",
    "threads": 2,
    "repeats": 3,
    "prompt_tokens": 64,
    "decode_tokens": 16,
    "ttft_ms": {"median": 20.0, "min": 19.0, "max": 22.0},
    "prefill_tok_s": {"median": 900.0, "min": 850.0, "max": 950.0},
    "decode_tok_s": SPREAD,
}
ARTIFACT = {
    "path": "out/gguf-q4/model.gguf",
    "format": "gguf",
    "runtime": "llama.cpp",
    "file_type": "Q4_K_M",
    "size_bytes": 105_000_000,
    "sha256": "ab" * 32,
    "tensor_types": {"Q4_K": 180, "F32": 61},
    "quant": "Q4_K_M",
}
PAIRED = {"n": 40, "right_to_wrong": 1, "wrong_to_right": 0, "difference": -0.025, "interval": [-0.1, 0.05]}
FIDELITY = {
    "kl_divergence_mean": 0.0123,
    "kl_divergence_p99": 0.2,
    "top1_agreement": 0.94,
    "perplexity_artifact": 5.1,
    "perplexity_artifact_err": 0.1,
    "perplexity_delta_pct": 2.0,
    "task_accuracy_artifact": 0.6,
    "task_accuracy_reference": 0.625,
    "artifact_stop_rate": 1.0,
    "kl_divergence_interval": [0.011, 0.014],
    "task_accuracy_base": 0.2,
    "task_accuracy_paired": PAIRED,
}
LATENCY = {
    "threads": 2,
    "decode_tok_s": 80.0,
    "reference_decode_tok_s": 20.0,
    "speedup": 4.0,
    "prefill_tok_s": 900.0,
    "ttft_ms": 20.0,
    "artifact": LAT,
    "reference": LAT,
    "timed": TIMED,
    "device_state": None,
    "sustained": None,
}
MEMORY = {"peak_rss_bytes": 2e8, "load_s": 0.2, "reference_peak_rss_bytes": 6e8, "reference_load_s": 1.5}
ROOFLINE = {
    "read_bandwidth_gb_s": {"median": 20.0, "min": 18.0, "max": 22.0},
    "bytes_per_token": 100_000_000,
    "decode_tok_s_ceiling_projected": 220.0,
    "fraction": 80 / 220,
}
GOLDEN = [
    {
        "question": "How long do I boil an egg?",
        "expected": "9 minutes",
        "reference": "9 minutes",
        "reference_correct": True,
        "artifact": "9 minutes",
        "artifact_correct": True,
        "artifact_stopped": True,
    }
]
ANSWERS = [{"reply": "9 minutes", "correct": True, "stopped": True}]
GATES = [{"name": "max_kld", "description": "mean KL divergence", "limit": 0.05, "value": 0.0123, "passed": True}]
REFERENCE = {
    "path": "out/merged",
    "stored": "out/reference",
    "size_bytes": 540_000_000,
    "dtype": "float32",
    "top_k": 64,
    "task_accuracy": 0.625,
    "answers_correct": [True],
    "perplexity": 5.0,
    "performance": {"latency": LAT, "peak_rss_bytes": 6e8, "load_s": 1.5},
    "machine": MACHINE,
    "timed": TIMED,
}
LADDER = [{"stage": "reference", "runtime": "torch", "quant": "fp32", "size_bytes": 540_000_000}]
EVAL = {"file": "eval.jsonl", "examples": 1, "scored_positions": 12, "question_ids": ["0123456789abcdef"]}
STAGES = [{"stage": "merge", "seconds": 1.5, "cached": False, "peak_rss_bytes": 1, "start_rss_bytes": 1}]


def entry() -> TargetEntry:
    return TargetEntry(
        "gguf-q4", ARTIFACT, FIDELITY, LATENCY, MEMORY, ROOFLINE, GOLDEN, ANSWERS, gates=GATES, passed=True
    )


def build_report() -> Report:
    return Report(
        REFERENCE,
        [entry()],
        LADDER,
        EVAL,
        MACHINE,
        run_id="r1",
        warnings=["a warning"],
        regressions=[],
        passed=True,
        device_runs=[],
        stages=STAGES,
        merge={"strategy": "fp"},
        training={"method": "lora", "steps": 10},
    )


def old_build_report() -> dict:
    """The dict pipeline.finish_report wrote before the report had types, built here key by key."""
    target = {
        "target": "gguf-q4",
        "artifact": ARTIFACT,
        "fidelity": FIDELITY,
        "latency": LATENCY,
        "memory": MEMORY,
        "roofline": ROOFLINE,
        "golden": GOLDEN,
        "answers": ANSWERS,
        "gates": GATES,
        "passed": True,
    }
    return {
        "schema_version": 2,
        "edgeft_version": __version__,
        "target": "gguf-q4",
        "artifact": ARTIFACT,
        "fidelity": FIDELITY,
        "latency": LATENCY,
        "memory": MEMORY,
        "roofline": ROOFLINE,
        "golden": GOLDEN,
        "reference": REFERENCE,
        "targets": [target],
        "ladder": LADDER,
        "eval": EVAL,
        "machine": MACHINE,
        "run_id": "r1",
        "gates": GATES,
        "warnings": ["a warning"],
        "regressions": [],
        "passed": True,
        "device_runs": [],
        "stages": STAGES,
        "merge": {"strategy": "fp"},
        "training": {"method": "lora", "steps": 10},
    }


def same_json(a: dict, b: dict) -> bool:
    """Equal as report.json is written: same keys, same values, same order."""
    return json.dumps(a, indent=2) == json.dumps(b, indent=2)


def test_a_build_report_writes_the_dict_it_was_before_it_had_types():
    assert same_json(build_report().to_json(), old_build_report())


def test_a_report_read_back_is_equal_to_the_one_written():
    report = build_report()
    assert Report.from_json(report.to_json()) == report
    assert Report.from_json(json.loads(json.dumps(report.to_json()))) == report


def test_keys_this_edgeft_does_not_know_survive_a_round_trip():
    old = old_build_report()
    old["from_a_newer_edgeft"] = {"x": 1}
    old["targets"][0] = {**old["targets"][0], "energy_j": 3.5}
    report = Report.from_json(old)
    assert report.extra == {"from_a_newer_edgeft": {"x": 1}}
    assert report.targets[0].extra == {"energy_j": 3.5}
    assert report.to_json() == old


def test_a_device_report_without_the_first_target_at_the_top_is_written_back_as_it_was():
    device = {k: v for k, v in old_build_report().items() if k not in ("target", "artifact", "gates", "golden")}
    device = {k: v for k, v in device.items() if k not in ("fidelity", "latency", "memory", "roofline")}
    del device["schema_version"], device["merge"], device["training"]
    report = Report.from_json(device)
    assert report.schema_version is None and report.merge is None and not report.first_at_top
    assert same_json(report.to_json(), device)


def test_a_version_1_report_loads_with_its_entry_kept_at_the_top():
    v1 = {"target": "gguf-q4", "artifact": ARTIFACT, "fidelity": FIDELITY, "gates": GATES, "passed": False}
    report = Report.from_json(v1)
    assert report.targets is None and report.passed is False
    assert report.to_json() == v1


def test_a_bench_stage_result_round_trips():
    results = {
        "artifact": {k: v for k, v in ARTIFACT.items() if k != "quant"},
        "fidelity": FIDELITY,
        "answers": ANSWERS,
        "performance": {"latency": LAT, "peak_rss_bytes": 2e8, "load_s": 0.2},
        "roofline": {"bytes_per_token": 100_000_000},
        "machine": MACHINE,
    }
    torch_row = {"fidelity": FIDELITY, "answers": ANSWERS, "dtype": "float32", "a_later_key": 1}
    for d in (results, torch_row):
        assert same_json(BenchResult.from_json(d).to_json(), d)
    assert BenchResult.from_json(torch_row).extra == {"a_later_key": 1}


def test_the_writers_build_the_entry_and_report_the_old_code_built():
    from edgeft.report import assemble, question_id, target_entry

    examples = [
        {"messages": [{"role": "user", "content": "How long do I boil an egg?"}, {"role": "assistant", "content": "9 minutes"}],
         "answers": ["9 minutes"]},
    ]  # fmt: skip
    perf = {"latency": LAT, "peak_rss_bytes": 2e8, "load_s": 0.2, **TIMED}
    ref_meta = {
        "model": "out/merged", "model_size_bytes": 540_000_000, "top_k": 64, "task_accuracy": 1.0,
        "answers": ANSWERS, "perplexity": 5.0, "performance": {**perf, "peak_rss_bytes": 6e8}, "machine": MACHINE,
        "eval_file": "eval.jsonl", "examples": examples, "positions": 12,
    }  # fmt: skip
    measured = BenchResult.from_json(
        {
            "artifact": {k: v for k, v in ARTIFACT.items() if k != "quant"},
            "fidelity": {"kl_divergence_mean": 0.0123},
            "answers": ANSWERS,
            "performance": perf,
            "roofline": {"bytes_per_token": 100_000_000},
            "machine": MACHINE,
        }
    )
    bandwidth = {"median": 20.0, "min": 18.0, "max": 22.0}
    entry = target_entry("gguf-q4", "Q4_K_M", measured, ref_meta, 0.2, 1, bandwidth)
    paired = entry.fidelity.pop("task_accuracy_paired")
    assert paired["n"] == 1 and paired["both_right"] == 1
    lat = {
        "threads": 2, "decode_tok_s": 80.0, "reference_decode_tok_s": 80.0, "speedup": 1.0, "prefill_tok_s": 900.0,
        "ttft_ms": 20.0, "artifact": LAT, "reference": LAT, "timed": TIMED, "device_state": None, "sustained": None,
    }  # fmt: skip
    expected_entry = {
        "target": "gguf-q4",
        "artifact": ARTIFACT,
        "fidelity": {"kl_divergence_mean": 0.0123, "task_accuracy_base": 0.2},
        "latency": lat,
        "memory": {"peak_rss_bytes": 2e8, "load_s": 0.2, "reference_peak_rss_bytes": 6e8, "reference_load_s": 0.2},
        "roofline": {
            "read_bandwidth_gb_s": bandwidth,
            "bytes_per_token": 100_000_000,
            "decode_tok_s_ceiling_projected": 220.0,
            "fraction": 80.0 / 220.0,
        },
        "golden": [{**GOLDEN[0], "reference_correct": True}],
        "answers": ANSWERS,
    }
    assert same_json(entry.to_json(), expected_entry)

    report = assemble([entry], "out/reference", ref_meta, LADDER, MACHINE)
    expected = {
        "schema_version": 2,
        "edgeft_version": __version__,
        **{k: expected_entry[k] for k in ("target", "artifact", "fidelity", "latency", "memory", "roofline", "golden")},
        "reference": {
            "path": "out/merged", "stored": "out/reference", "size_bytes": 540_000_000, "dtype": "float32", "top_k": 64,
            "task_accuracy": 1.0, "answers_correct": [True], "perplexity": 5.0, "performance": ref_meta["performance"],
            "machine": MACHINE, "timed": TIMED,
        },
        "targets": [expected_entry],
        "ladder": LADDER,
        "eval": {"file": "eval.jsonl", "examples": 1, "scored_positions": 12, "question_ids": [question_id(examples[0])]},
        "machine": MACHINE,
    }  # fmt: skip
    assert same_json(report.to_json(), expected)
    assert Report.from_json(report.to_json()) == report


def _scored(target: str, quant: str, kld: float, task: float) -> TargetEntry:
    fidelity = {"kl_divergence_mean": kld, "task_accuracy_artifact": task, "task_accuracy_reference": 0.308}
    return TargetEntry(target, {"quant": quant}, fidelity, {}, {}, {}, [])


def test_a_target_that_lost_the_fine_tune_is_named_with_its_share_of_the_bases_distance() -> None:
    """The Qwen2.5-Coder-0.5B cooking build's figures: base 1.371 from the fine-tune; Q8_0 kept it,
    Q4_K_M is half-way back to the base and Q4_0 is further away than the base."""
    from edgeft.report import fine_tune_lost

    base = {"kl_divergence_mean": 1.3713, "task_accuracy_artifact": 0.064}
    entries = [
        _scored("gguf-q8", "Q8_0", 0.0006, 0.295),
        _scored("gguf-q4", "Q4_K_M", 0.6952, 0.179),
        _scored("gguf-q4_0", "Q4_0", 2.2444, 0.051),
    ]
    warnings = fine_tune_lost(entries, base)
    assert len(warnings) == 2
    assert warnings[0].startswith("gguf-q4 (Q4_K_M): mean KLD 0.695 against the base model's 1.37")
    assert "is 51% as far from the fine-tuned model as the untuned base is" in warnings[0]
    assert "task accuracy 17.9% (base 6.4%, fine-tuned 30.8%)" in warnings[0]
    assert (
        warnings[1].startswith("gguf-q4_0 (Q4_0)")
        and "further from the fine-tuned model than the untuned" in warnings[1]
    )
    # SmolLM2's cooking build: its worst 4-bit target is 11% of the base's distance; no base row: nothing
    assert fine_tune_lost([_scored("onnx-int4", "int4", 0.2312, 0.5)], {"kl_divergence_mean": 2.0758}) == []
    assert fine_tune_lost(entries, None) == []
