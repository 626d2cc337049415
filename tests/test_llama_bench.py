"""llama-bench's JSON as measured device rows.

The samples in tests/data are real `llama-bench` output (llama.cpp as vendored by llama-cpp-python
0.3.36, built here with the Makefile's CPU options) on the cooking example's Q4_K_M and Q8_0 files:
`-p 512 -n 128 -r 3 -o json` and `-t 1,2 -p 64 -n 16 -pg 64,16 -r 2 -o jsonl`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from edgeft.bench import device_runs, llama_bench
from edgeft.errors import ConfigError

DATA = Path(__file__).resolve().parent / "data"
SAMPLE_JSON = DATA / "llama-bench-cooking.json"
SAMPLE_JSONL = DATA / "llama-bench-cooking.jsonl"
# Tensor bytes of SmolLM2-135M's Q4_K_M and Q8_0 GGUF files (sum of tensor sizes; shapes and types
# alone decide them, so any fine-tune of the model shares them).
SIZES = {"gguf-q4": 103_668_480, "gguf-q8": 143_025_408}


def test_json_sample_becomes_one_row_per_model_matched_by_tensor_bytes():
    raw = json.loads(SAMPLE_JSON.read_text())
    run = llama_bench.device_run(SAMPLE_JSON, SIZES, "2026-11-28T00:00:00+00:00")
    assert run["source"] == "llama-bench"
    assert run["machine"]["cpu_model"] == raw[0]["cpu_info"]
    assert run["machine"]["runtime_builds"]["llama-bench"].startswith(f"build {raw[0]['build_number']}")
    assert [r["target"] for r in run["rows"]] == ["gguf-q4", "gguf-q8"]
    for row in run["rows"]:
        tests = [t for t in raw if t["model_size"] == SIZES[row["target"]]]
        pp = next(t for t in tests if t["n_gen"] == 0)
        tg = next(t for t in tests if t["n_prompt"] == 0)
        assert row["threads"] == pp["n_threads"]
        assert row["prefill"]["tokens"] == pp["n_prompt"] == 512
        assert row["decode"]["tokens"] == tg["n_gen"] == 128
        assert row["prefill"]["tok_s"]["median"] == pytest.approx(statistics.median(pp["samples_ts"]))
        assert row["decode"]["tok_s"]["min"] == pytest.approx(min(tg["samples_ts"]))
        assert row["decode"]["tok_s"]["mean"] == pytest.approx(tg["avg_ts"])
        assert row["decode"]["tok_s"]["stddev"] == pytest.approx(tg["stddev_ts"])
        assert row["decode"]["tok_s"]["samples"] == len(tg["samples_ts"])
        assert row["other_tests"] == [] and row["kl_divergence_mean"] is None


def test_jsonl_sample_groups_by_thread_count_and_keeps_combined_tests_apart():
    run = llama_bench.device_run(SAMPLE_JSONL, SIZES, "now")
    assert [(r["target"], r["threads"]) for r in run["rows"]] == [("gguf-q4", 1), ("gguf-q4", 2)]
    for row in run["rows"]:
        assert row["prefill"]["tokens"] == 64 and row["decode"]["tokens"] == 16
        assert [t["test"] for t in row["other_tests"]] == ["pp64+tg16"]


def test_unknown_fields_are_ignored_and_missing_samples_fall_back_to_the_mean(tmp_path):
    records = json.loads(SAMPLE_JSON.read_text())
    for rec in records:
        rec["a_field_from_a_newer_build"] = {"x": 1}
        del rec["samples_ts"], rec["samples_ns"], rec["cpu_info"]
    path = tmp_path / "lb.json"
    path.write_text(json.dumps(records))
    run = llama_bench.device_run(path, {}, "now")
    assert [r["target"] for r in run["rows"]] == [None, None]  # not in this build: kept, unmatched
    assert run["machine"]["cpu_model"] is None
    s = run["rows"][0]["prefill"]["tok_s"]
    assert "median" not in s and s["mean"] == pytest.approx(records[0]["avg_ts"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no llama-bench tests"),
        ("garbage", ":1: not llama-bench JSON"),
        ("[]", "no llama-bench tests"),
        ('[{"n_prompt": 512, "n_gen": 0}]', "test 1: avg_ts: expected tokens per second"),
        ('[{"n_prompt": "512", "n_gen": 0, "avg_ts": 5}]', "test 1: n_prompt: expected a token count"),
        ('[{"n_prompt": 0, "n_gen": 0, "avg_ts": 5}]', "not a llama-bench test"),
        ('[{"n_prompt": 1, "n_gen": 0, "avg_ts": 5, "samples_ts": ["x"]}]', "samples_ts"),
        ('{"n_prompt": 1, "n_gen": 0, "avg_ts": 5}\n{"n_prompt": 1,\n', ":2: not a JSON object"),
        ('[{"n_prompt": 1, "n_gen": 0, "avg_ts": 5},\n {"n_prompt"\n]', ":3: not llama-bench JSON"),
        ("[1, 2]", "test 1: expected a JSON object"),
    ],
)
def test_bad_llama_bench_files_name_the_place(tmp_path, text, message):
    path = tmp_path / "lb.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        llama_bench.read_records(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_stored_runs_render_in_their_own_section(tmp_path):
    from edgeft.report import _device_runs_section

    run = llama_bench.device_run(SAMPLE_JSON, {"gguf-q4": SIZES["gguf-q4"]}, "2026-11-28T00:00:00+00:00")
    device_runs.save(tmp_path, "llama-bench-x", run)
    runs = device_runs.load_all(tmp_path)
    assert [r["key"] for r in runs] == ["llama-bench-x"]
    md = "\n".join(_device_runs_section(runs))
    assert "Measured on other machines" in md
    q4 = run["rows"][0]
    assert f"{q4['decode']['tok_s']['median']:.1f} [" in md and "(tg128)" in md and "(pp512)" in md
    assert "(not in this build)" in md  # the Q8_0 file was not given as a target
    assert str(SAMPLE_JSON.resolve()) in md


def test_a_broken_stored_run_is_named(tmp_path):
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "x.json").write_text("{")
    with pytest.raises(ConfigError, match=r"devices/x.json: unreadable device run"):
        device_runs.load_all(tmp_path)
