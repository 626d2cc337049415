"""The per-token floor model: fitting ms/token against bytes/token, projecting a range with its
basis, and `edgeft devices calibrate` writing a profile that reproduces its own fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner

from edgeft.calibrate import calibrate, profile_toml, runs_from_llama_bench, runs_from_report, write_profile
from edgeft.cli import cli
from edgeft.decode_model import MIN_UNCERTAINTY_PCT, FitRun, describe_range, fit, project_decode
from edgeft.devices import devices_dir, get_device, project
from edgeft.errors import ConfigError, OutputError

DATA = Path(__file__).resolve().parent / "data"
SAMPLE_JSON = DATA / "llama-bench-cooking.json"  # Q4_K_M and Q8_0 of SmolLM2, 2 threads
SAMPLE_JSONL = DATA / "llama-bench-cooking.jsonl"  # Q4_K_M only, 1 and 2 threads


def _run(size_mb: float, t0_ms: float, gb_s: float, threads: int = 4, **kw) -> FitRun:
    tok_s = 1000 / (t0_ms + size_mb / gb_s)
    return FitRun(model=f"m{size_mb:g}", type="Q8_0", size_bytes=int(size_mb * 1e6), threads=threads, tok_s=tok_s, **kw)


def test_fit_recovers_the_per_token_cost_and_bandwidth_of_exact_runs():
    runs = [_run(mb, 3.0, 12.0) for mb in (100, 250, 500)]
    f = fit(runs, "llama.cpp", "made up")
    assert f.per_token_ms == pytest.approx(3.0) and f.bandwidth_gb_s == pytest.approx(12.0)
    assert all(abs(r.residual_pct) < 1e-9 for r in f.runs)
    assert f.uncertainty_pct == MIN_UNCERTAINTY_PCT  # never a band narrower than this
    assert f.tok_s(300e6) == pytest.approx(1000 / (3.0 + 25.0))


def test_the_band_is_the_worst_residual_or_the_widest_run_spread():
    runs = [_run(100, 3.0, 12.0), _run(250, 3.0, 12.0, spread_pct=9.0), _run(500, 3.0, 12.0)]
    assert fit(runs, "llama.cpp", "x").uncertainty_pct == pytest.approx(9.0)
    noisy = [_run(100, 3.0, 12.0), replace_tok_s(_run(250, 3.0, 12.0), 0.8), _run(500, 3.0, 12.0)]
    f = fit(noisy, "llama.cpp", "x")
    worst = max(abs(1000 / r.tok_s - 1000 / r.fitted_tok_s) / (1000 / r.fitted_tok_s) for r in f.runs)
    assert f.uncertainty_pct == pytest.approx(100 * worst) and f.uncertainty_pct > MIN_UNCERTAINTY_PCT


def replace_tok_s(run: FitRun, factor: float) -> FitRun:
    from dataclasses import replace

    return replace(run, tok_s=run.tok_s * factor)


def test_a_negative_per_token_cost_is_refitted_through_the_origin_and_said():
    runs = [_run(100, 0.0, 10.0), replace_tok_s(_run(200, 0.0, 10.0), 0.8)]  # steeper than bandwidth alone
    f = fit(runs, "llama.cpp", "x")
    assert f.per_token_ms == 0.0 and "negative per-token cost" in f.note


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([_run(100, 3, 12), _run(100.5, 3, 12)], "1 artifact size"),  # within 1%: one size
        ([_run(100, 3, 12), replace_tok_s(_run(300, 3, 12), 3.0)], "does not grow with artifact size"),
    ],
)
def test_fits_that_cannot_be_made_are_refused(runs, message):
    with pytest.raises(ConfigError, match=message):
        fit(runs, "llama.cpp", "x")


def test_every_projection_is_a_range_with_its_basis():
    f = fit([_run(mb, 3.0, 12.0) for mb in (100, 500)], "llama.cpp", "x")
    inside = project_decode(300_000_000, f, 10.0, 2.0)
    assert inside["basis"] == "fit" and not inside["extrapolated"]
    assert inside["low"] < inside["estimate"] < inside["high"] < inside["ceiling"]
    assert inside["estimate"] == pytest.approx(1000 / 28.0)
    outside = project_decode(1_000_000_000, f, 10.0, 2.0)
    assert outside["extrapolated"] and outside["uncertainty_pct"] == 2 * inside["uncertainty_pct"]
    prior = project_decode(300_000_000, None, 10.0, 2.0)
    assert prior["basis"] == "prior" and prior["low"] == prior["estimate"] == pytest.approx(1000 / 32.0)
    assert prior["high"] == prior["ceiling"] == pytest.approx(10e9 / 300e6)
    ceiling = project_decode(300_000_000, None, 10.0, None)
    assert ceiling["basis"] == "ceiling" and ceiling["low"] is None
    assert describe_range(ceiling).startswith("≤ ") and "–" in describe_range(prior) and "[" in describe_range(inside)


def test_shipped_fits_are_reproduced_by_refitting_their_own_runs():
    for path in sorted(devices_dir().glob("*.toml")):
        d = get_device(str(path))
        assert d.per_token_ms_prior is not None and len(d.per_token_ms_prior_source) > 20, d.key
        for stored in d.decode_fit:
            again = fit([r for r in stored.runs], stored.runtime, stored.source)
            assert again.per_token_ms == pytest.approx(stored.per_token_ms, abs=1e-4), d.key
            assert again.bandwidth_gb_s == pytest.approx(stored.bandwidth_gb_s, rel=1e-5), d.key
            assert again.uncertainty_pct == pytest.approx(stored.uncertainty_pct, abs=1e-4), d.key
            for r in stored.runs:
                assert stored.tok_s(r.size_bytes) == pytest.approx(r.fitted_tok_s, rel=1e-5)


def test_rpi5_projection_against_the_published_qwen_half_b_figure():
    # Qwen2.5-0.5B Q4_K_M (398 MB, tied embeddings) decodes at 25.77 tok/s on a Pi 5, 4 threads
    # (llama.cpp issue #26484). The fit includes that run, so this checks consistency, not prediction.
    p = project(get_device("rpi5"), "gguf", 398_000_000, 600_000_000, 12_288, 2048, 2048)
    assert p["decode_basis"] == "fit" and "issue #26484" in p["method"]
    assert p["decode_tok_s_low"] <= 25.77 <= p["decode_tok_s_high"]
    assert abs(p["decode_tok_s"] - 25.77) / 25.77 < 0.02
    # A 135M model: the floor model is well below the bandwidth-only ceiling.
    small = project(get_device("rpi5"), "gguf", 145_000_000, 300_000_000, None, 2048, 2048)
    assert small["decode_tok_s"] < 0.85 * small["decode_tok_s_ceiling"]


# --------------------------------------------------------------------------------------------
# edgeft devices calibrate


def test_calibrating_from_the_committed_llama_bench_sample_round_trips(tmp_path):
    result, key = calibrate("rpi5", [SAMPLE_JSON], [], "2026-12-01T00:00:00+00:00", "edgeft devices calibrate ...")
    assert key == "rpi5" and [(f.runtime, f.threads) for f in result.fits] == [("llama.cpp", 2)]
    out = write_profile(tmp_path / "my-pi.toml", result.profile_text)
    mine = get_device(str(out))
    assert mine.based_on == "rpi5" and mine.threads == 2  # the sample ran at 2 threads
    assert mine.bandwidth_theoretical_source == get_device("rpi5").bandwidth_theoretical_source  # sources kept
    assert mine.fit_for("llama.cpp", 4) == get_device("rpi5").fit_for("llama.cpp", 4)  # other threads kept
    f = mine.fit_for("llama.cpp")
    raw = [t for t in json.loads(SAMPLE_JSON.read_text()) if t["n_prompt"] == 0]
    assert sorted(r.size_bytes for r in f.runs) == sorted(t["model_size"] for t in raw)
    for r in f.runs:
        p = project(mine, "gguf", r.size_bytes, 1, None, 1, 1)
        assert p["decode_basis"] == "fit"
        assert p["decode_tok_s"] == pytest.approx(r.fitted_tok_s, rel=1e-5)
        assert p["decode_tok_s_low"] <= r.tok_s <= (p["decode_tok_s_high"] or float("inf"))


def test_a_calibrated_fit_reproduces_exact_runs_through_the_written_file(tmp_path):
    records = []
    for mb, q in ((145, "Q8_0"), (106, "Q4_K_M"), (92, "Q4_0"), (290, "Q8_0")):
        tok_s = 1000 / (4.0 + mb / 20.0)
        records.append({"model_filename": f"/m/{q}-{mb}.gguf", "model_type": f"llama {q}", "model_size": mb * 10**6,
                        "n_threads": 2, "n_prompt": 0, "n_gen": 64, "avg_ts": tok_s, "samples_ts": [tok_s] * 3,
                        "cpu_info": "Cortex-A76"})  # fmt: skip
        records.append(dict(records[-1], n_prompt=64, n_gen=0, avg_ts=500.0, samples_ts=[500.0]))  # prefill: ignored
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(records))
    assert len(runs_from_llama_bench(path)) == 4
    result, _ = calibrate("laptop-x86", [path], [], "now", "cmd")
    mine = get_device(str(write_profile(tmp_path / "lap.toml", result.profile_text)))
    f = mine.fit_for("llama.cpp", 2)
    assert f.per_token_ms == pytest.approx(4.0, abs=1e-4) and f.bandwidth_gb_s == pytest.approx(20.0, rel=1e-5)
    p = project(mine, "gguf", 200_000_000, 1, None, 1, 1)
    assert p["decode_tok_s"] == pytest.approx(1000 / 14.0, rel=1e-5) and p["decode_basis"] == "fit"


def test_calibrating_from_reports_uses_bytes_per_token_and_the_median(tmp_path):
    def target(name, bpt, med):
        return {
            "target": name,
            "artifact": {"path": f"/b/{name}/model.gguf", "quant": name, "format": "gguf", "runtime": "llama.cpp"},
            "latency": {
                "threads": 2,
                "artifact": {"decode_tok_s": {"median": med, "min": med * 0.9, "max": med * 1.1}},
            },
            "roofline": {"bytes_per_token": bpt},
        }

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"machine": {"cpu_model": "AMD EPYC"}, "targets": [target("q8", 145_000_000, 100.0)]}))
    b.write_text(json.dumps({"machine": {"cpu_model": "AMD EPYC"}, "targets": [target("q4", 92_000_000, 130.0)]}))
    runs = runs_from_report(a) + runs_from_report(b)
    assert [(rt, r.size_bytes, r.tok_s, r.spread_pct) for rt, r in runs] == [
        ("llama.cpp", 145_000_000, 100.0, pytest.approx(10.0)),
        ("llama.cpp", 92_000_000, 130.0, pytest.approx(10.0)),
    ]
    with pytest.raises(ConfigError, match="1 artifact size"):
        calibrate("rpi5", [], [a], "now", "cmd")  # one report, one size
    result, _ = calibrate("rpi5", [], [a, b], "now", "cmd")
    assert result.fits[0].threads == 2 and result.fits[0].uncertainty_pct >= 10.0 and not result.warnings
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"targets": [{"target": "x"}]}))
    with pytest.raises(ConfigError, match="not an edgeft report.json"):
        runs_from_report(bad)


def test_one_size_is_a_one_line_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "p.toml"
    result = CliRunner().invoke(
        cli, ["devices", "calibrate", "rpi5", "--llama-bench", str(SAMPLE_JSONL), "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "at least 2 sizes" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()
    none = CliRunner().invoke(cli, ["devices", "calibrate", "rpi5"])
    assert none.exit_code == 2 and "--llama-bench FILE or --report FILE" in none.output


def test_cli_calibrate_prints_the_fit_and_the_listing_shows_it(tmp_path):
    out = tmp_path / "my-pi.toml"
    result = CliRunner().invoke(
        cli, ["devices", "calibrate", "rpi5", "--llama-bench", str(SAMPLE_JSON), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "llama.cpp, 2 threads:" in result.output and f"wrote {out}" in result.output
    text = out.read_text()
    assert text.startswith("# Written by `edgeft devices calibrate rpi5 --llama-bench ")
    assert tomllib.loads(text)["based_on"] == "rpi5"
    listing = CliRunner().invoke(cli, ["devices"])
    assert listing.exit_code == 0 and "rpi5" in listing.output and "fitted" in listing.output


def test_a_shipped_profile_is_never_overwritten(tmp_path):
    with pytest.raises(OutputError, match="edgeft's own profiles"):
        write_profile(devices_dir() / "rpi5.toml", "x = 1\n")
    with pytest.raises(ConfigError, match=r"\.toml"):
        write_profile(tmp_path / "p.txt", "x = 1\n")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('runtime = "llama.cpp"\nthreads = 0', "threads: expected a thread count"),
        ('runtime = "llama.cpp"\nthreads = 4\nper_token_ms = -1', "per_token_ms: expected milliseconds"),
        ("bogus = 1", "unknown key 'bogus'"),
    ],
)
def test_bad_fit_tables_name_the_key(tmp_path, table, message):
    text = (devices_dir() / "rpi5.toml").read_text()
    head = text[: text.index("\n[[decode_fit]]\n") + 1]
    path = tmp_path / "bad.toml"
    path.write_text(head + "[[decode_fit]]\n" + table + "\n")
    with pytest.raises(ConfigError, match=message):
        get_device(str(path))


def test_profile_toml_round_trips_strings_with_quotes_and_unicode():
    raw = {"name": 'Pi "5" — ünïcode\\', "threads": 4, "isa": ["NEON"], "x": 0.1, "decode_fit": [{"a": 1}]}
    assert tomllib.loads(profile_toml(raw, ["header"])) == raw
