"""Check the per-token floor model on this machine: time GGUF files, fit on some, predict the rest.

    .venv/bin/python scripts/bench_device_model.py --threads 2 \\
        --make smollm2-135m --make gemma3-270m --make qwen2.5-coder-0.5b --workdir out/device-model \\
        --calibrate-on Q8_0 --rounds 2 --json out/device-model/result.json

or with GGUF paths of your own (positional). ``--make MODEL`` produces the missing files with the
edgeft CLI (``edgeft export --target gguf-f32`` then ``edgeft quantize`` to each of ``--types``,
default Q8_0, Q4_K_M, Q4_0) under ``--workdir``, and reuses them on a second run.

Every file is timed with edgeft's own probe (one fresh process per file: the harness ``edgeft bench``
uses), files interleaved within each of ``--rounds`` rounds so load on a shared machine falls on all
alike; decode ms/token is the median [min–max] of every timed repetition's decode speed. The files
whose type is in ``--calibrate-on`` (at least two sizes) are fitted with
:func:`edgeft.decode_model.fit` (ms/token = t0 + bytes read per token / bandwidth); every file is then
predicted from that fit as ``edgeft bench --device`` would project it. Printed: a markdown table
(model, type, MB, measured tok/s, predicted range, error %), the fit, the median absolute error over
the held-out files (the issue's acceptance: ≤ 15%) and over all files, and the old bandwidth-only
projection's errors for comparison, both at the read bandwidth measured here (what the report's
roofline used) and at the bandwidth that best fits the calibration files alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from edgeft.bench.bandwidth import measure_read_bandwidth
from edgeft.bench.probe import run_probe
from edgeft.decode_model import FitRun, describe_range, fit, project_decode
from edgeft.errors import EdgeftError
from edgeft.formats.gguf.inspect import describe, read_gguf
from edgeft.machine import describe as describe_machine
from edgeft.machine import summary

TYPE_TARGETS = {"Q8_0": "gguf-q8", "Q4_K_M": "gguf-q4", "Q4_0": "gguf-q4_0", "Q5_K_M": "gguf-q5", "Q6_K": "gguf-q6"}


def edgeft(*args: str) -> None:
    print("$ edgeft " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "edgeft", *args], check=True)


def make(model: str, workdir: Path, types: list[str]) -> list[tuple[Path, str]]:
    """The model's GGUF files of ``types``, exported and quantized with the edgeft CLI where missing."""
    folder = workdir / model.replace("/", "_")
    f32 = folder / "gguf-f32"
    out = []
    for quant in types:
        target = TYPE_TARGETS[quant]
        path = folder / target / "model.gguf"
        if not path.is_file():
            if not (f32 / "model.gguf").is_file():
                edgeft("export", "--model", model, "--target", "gguf-f32", "--out", str(f32))
            edgeft("quantize", "--gguf", str(f32), "--target", target, "--out", str(folder / target))
        out.append((path, model))
    return out


def identify(path: Path, name: str | None = None) -> dict:
    reader = read_gguf(path)
    info = describe(path, reader)
    field = reader.get_field("general.name")
    name = name or (field.contents() if field is not None else None)
    return {
        "path": str(path),
        "model": name if isinstance(name, str) and name else path.parent.name,
        "type": info["file_type"],
        "size_bytes": info["size_bytes"],
        "bytes_per_token": info["bytes_per_token"],
        "tensor_types": info["tensor_types"],
    }


def pct(pred: float, measured: float) -> float:
    return 100 * (pred - measured) / measured


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", nargs="*", type=Path, help="GGUF files to time")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--make", action="append", default=[], metavar="MODEL", help="a built-in model to export")
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q4_0", help="with --make: the quantizations to produce")
    ap.add_argument("--workdir", type=Path, default=Path("out/device-model"), help="with --make: where files go")
    ap.add_argument("--calibrate-on", default="Q8_0", help="comma-separated file types the fit uses")
    ap.add_argument("--rounds", type=int, default=2, help="passes over all files, interleaved")
    ap.add_argument("--repeats", type=int, default=5, help="timed generations per probe")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, help="also write every figure here")
    a = ap.parse_args()

    types = [t.strip() for t in a.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in TYPE_TARGETS]
    if unknown:
        ap.error(f"--types {unknown[0]}: expected some of {', '.join(TYPE_TARGETS)}")
    paths = [(p, None) for p in a.gguf] + [made for m in a.make for made in make(m, a.workdir, types)]
    if not paths:
        ap.error("give GGUF files or --make MODEL")
    files = [identify(p, name) for p, name in paths]
    calib_types = {t.strip() for t in a.calibrate_on.split(",")}

    # 1. time: every file once per round, files interleaved
    machine = None
    for r in range(a.rounds):
        for f in files:
            probe = run_probe(
                "llama.cpp", Path(f["path"]), a.threads, a.prompt_tokens, a.decode_tokens, a.repeats, timeout=1800
            )
            machine = machine or probe["machine"]
            lat = probe["latency"]
            f.setdefault("rounds", []).append(lat["decode_tok_s"])
            print(
                json.dumps({"round": r + 1, "model": f["model"], "type": f["type"], **lat["decode_tok_s"]}), flush=True
            )
    for f in files:  # median of the rounds' medians; min and max over every timed repetition
        rounds = f["rounds"]
        f["measured"] = {
            "median": statistics.median(x["median"] for x in rounds),
            "min": min(x["min"] for x in rounds),
            "max": max(x["max"] for x in rounds),
        }
    bandwidth = measure_read_bandwidth(a.threads)["read_gb_s"]

    # 2. fit on the calibration types, predict every file
    runs = [
        FitRun(
            model=f["model"],
            type=f["type"],
            size_bytes=f["bytes_per_token"],
            threads=a.threads,
            tok_s=f["measured"]["median"],
            spread_pct=100 * (f["measured"]["max"] - f["measured"]["min"]) / 2 / f["measured"]["median"],
            source=f["path"],
        )
        for f in files
        if f["type"] in calib_types
    ]
    try:
        model = fit(runs, "llama.cpp", f"this machine, {a.threads} threads, {', '.join(sorted(calib_types))} files")
    except EdgeftError as e:
        print(f"cannot fit on {', '.join(sorted(calib_types))}: {e}", file=sys.stderr)
        return 2
    xs = [r.size_bytes / 1e6 for r in runs]
    ys = [1000 / r.tok_s for r in runs]
    bw_only = sum(x * x for x in xs) / sum(x * y for x, y in zip(xs, ys))  # GB/s, least squares through 0
    rows = []
    for f in files:
        p = project_decode(f["bytes_per_token"], model, model.bandwidth_gb_s, None)
        m = f["measured"]["median"]
        rows.append(
            {
                **{k: f[k] for k in ("model", "type", "path", "size_bytes", "bytes_per_token", "measured")},
                "calibration": f["type"] in calib_types,
                "predicted": p,
                "error_pct": pct(p["estimate"], m),
                "in_range": p["low"] <= m <= (p["high"] or float("inf")),
                "bandwidth_only_read_error_pct": pct(bandwidth["max"] * 1e9 / f["bytes_per_token"], m),
                "bandwidth_only_fitted_error_pct": pct(bw_only * 1e9 / f["bytes_per_token"], m),
            }
        )

    # 3. print
    print(f"\n{summary(machine or describe_machine())}; {a.threads} threads; {a.prompt_tokens}-token prompt, "
          f"{a.decode_tokens} decoded; {a.rounds} rounds x {a.repeats} timed runs, files interleaved\n")  # fmt: skip
    print(
        "| model | type | MB | MB read/token | measured tok/s | predicted tok/s | error % | role | "
        f"bandwidth-only @ {bandwidth['max']:.1f} GB/s read, error % | bandwidth-only @ {bw_only:.1f} GB/s fitted, error % |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        m = r["measured"]
        print(
            f"| {r['model']} | {r['type']} | {r['size_bytes'] / 1e6:.1f} | {r['bytes_per_token'] / 1e6:.1f} | "
            f"{m['median']:.1f} [{m['min']:.1f}–{m['max']:.1f}] | {describe_range(r['predicted'])} | "
            f"{r['error_pct']:+.1f}{'' if r['in_range'] else ' (outside)'} | {'calibration' if r['calibration'] else 'held out'} | "
            f"{r['bandwidth_only_read_error_pct']:+.0f} | {r['bandwidth_only_fitted_error_pct']:+.1f} |"
        )

    def mae(key: str, held_out: bool) -> str:
        vals = [abs(r[key]) for r in rows if not (held_out and r["calibration"])]
        return f"{statistics.median(vals):.1f}%" if vals else "n/a"

    held = [abs(r["error_pct"]) for r in rows if not r["calibration"]]
    verdict = "n/a (no held-out files)" if not held else ("PASS" if statistics.median(held) <= 15 else "FAIL")
    summary_lines = [
        f"fit ({len(runs)} {'/'.join(sorted(calib_types))} files): t0 = {model.per_token_ms:.2f} ms per token, "
        f"bandwidth = {model.bandwidth_gb_s:.2f} GB/s, band ±{model.uncertainty_pct:.0f}%"
        + (f" ({model.note})" if model.note else ""),
        f"median |error| of the floor model: held-out files {mae('error_pct', True)} (acceptance ≤ 15%: {verdict}); "
        f"all files {mae('error_pct', False)}",
        f"bandwidth-only, median |error| held out / all: at the measured read bandwidth "
        f"{mae('bandwidth_only_read_error_pct', True)} / {mae('bandwidth_only_read_error_pct', False)}; "
        f"at the best-fitting bandwidth {mae('bandwidth_only_fitted_error_pct', True)} / "
        f"{mae('bandwidth_only_fitted_error_pct', False)}",
    ]
    print("\n" + "\n".join(summary_lines))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "threads": a.threads,
                    "settings": {k: getattr(a, k) for k in ("rounds", "repeats", "prompt_tokens", "decode_tokens")},
                    "read_bandwidth_gb_s": bandwidth,
                    "fit": {
                        "per_token_ms": model.per_token_ms,
                        "bandwidth_gb_s": model.bandwidth_gb_s,
                        "uncertainty_pct": model.uncertainty_pct,
                        "note": model.note,
                    },
                    "bandwidth_only_fitted_gb_s": bw_only,
                    "rows": rows,
                    "summary": summary_lines,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
