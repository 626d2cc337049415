"""``edgeft devices calibrate``: a device's own per-token cost and bandwidth, fitted from its runs.

Runs come from llama-bench files measured on the device (``--llama-bench``: its decode tests,
``n_prompt`` 0, with ``model_size`` and ``n_threads``) or from edgeft reports (``--report``: every
target's decode speed, ``roofline.bytes_per_token`` and thread count, measured on the machine that
wrote the report). Runs are grouped by runtime and thread count; every group with at least two
artifact sizes is fitted (:func:`edgeft.decode_model.fit`). The result is a new profile file: the
base profile's fields and published sources unchanged, ``based_on`` naming it, and one
``[[decode_fit]]`` table per fit with the runs it came from and their residuals. Fits of the base
profile for other runtimes or thread counts are kept; one for the same runtime and threads is replaced.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from .bench import llama_bench
from .decode_model import DecodeFit, FitRun, fit_by_threads, fit_to_table
from .devices import _load, device_file, devices_dir, get_device
from .errors import ConfigError, OutputError
from .files import write_atomic
from .formats import default_runtime
from .loading import read_json_object
from .untrusted import INT, NUM, STR, ShapeError, check_shape, cleaned, list_of, optional, safe_text


@dataclass
class Calibration:
    fits: list[DecodeFit]
    notes: list[str]  # groups not fitted, refits through the origin
    warnings: list[str]  # runs from more than one CPU
    profile_text: str
    threads: int  # the written profile's thread count


# --------------------------------------------------------------------------------------------
# runs


def _spread_pct(center: float, lo: float | None, hi: float | None, sd: float | None) -> float | None:
    if lo is not None and hi is not None:
        return 100 * (hi - lo) / 2 / center
    return 100 * sd / center if sd is not None else None


def runs_from_llama_bench(path: Path) -> list[tuple[str, FitRun]]:
    """The decode tests of a llama-bench ``-o json``/``jsonl`` file as (runtime, run) pairs."""
    out = []
    for rec in llama_bench.read_records(Path(path)):
        if rec["n_prompt"] or not rec["n_gen"] or rec.get("n_depth"):
            continue  # prefill, combined and depth tests are not plain decode
        size, threads = rec.get("model_size"), rec.get("n_threads")
        if not size or not threads:
            continue  # the fit needs both; older builds may lack them
        s = llama_bench.speed(rec)
        center = s.get("median", s["mean"])
        out.append(
            (
                "llama.cpp",
                FitRun(
                    model=safe_text(Path(str(rec.get("model_filename") or "?")).name),
                    type=safe_text(str(rec.get("model_type") or "?")),
                    size_bytes=int(size),
                    threads=int(threads),
                    tok_s=float(center),
                    spread_pct=_spread_pct(center, s.get("min"), s.get("max"), s.get("stddev")),
                    source=safe_text(f"{Path(path).name} (llama-bench {rec.get('build_commit') or 'build ?'})"),
                    machine=safe_text(str(rec["cpu_info"])) if rec.get("cpu_info") else None,
                ),
            )
        )
    return out


_SPREAD = {"median": NUM, "min": optional(NUM), "max": optional(NUM)}
_REPORT_TARGET = {
    "target": STR,
    "artifact": {"path": STR, "quant": optional(STR), "runtime": optional(STR), "format": optional(STR)},
    "latency": {"threads": INT, "artifact": {"decode_tok_s": _SPREAD}},
    "roofline": {"bytes_per_token": INT},
}


def runs_from_report(path: Path) -> list[tuple[str, FitRun]]:
    """Every target of an edgeft ``report.json`` as a (runtime, run) pair: decode median [min–max]
    at the bench's thread count, against the artifact's weight bytes read per token."""
    path = Path(path)
    report = cleaned(read_json_object(path, f"--report {path}: no such file"), 64)
    try:
        check_shape(report, {"targets": list_of(_REPORT_TARGET, non_empty=True)})
    except ShapeError as e:
        raise ConfigError(f"--report {path}: not an edgeft report.json ({e})") from None
    cpu = (report.get("machine") or {}).get("cpu_model") if isinstance(report.get("machine"), dict) else None
    out = []
    for t in report["targets"]:
        s = t["latency"]["artifact"]["decode_tok_s"]
        art = t["artifact"]
        if not (s["median"] > 0 and t["roofline"]["bytes_per_token"] > 0 and t["latency"]["threads"] > 0):
            raise ConfigError(
                f"--report {path}: target {t['target']}: decode speed, bytes per token and threads must be > 0"
            )
        runtime = art.get("runtime") or default_runtime(art.get("format", "gguf"))
        out.append(
            (
                runtime,
                FitRun(
                    model=f"{t['target']} ({Path(art['path']).name})",
                    type=art.get("quant") or "?",
                    size_bytes=t["roofline"]["bytes_per_token"],
                    threads=t["latency"]["threads"],
                    tok_s=float(s["median"]),
                    spread_pct=_spread_pct(s["median"], s.get("min"), s.get("max"), None),
                    source=str(path),
                    machine=cpu if isinstance(cpu, str) else None,
                ),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# fit and profile


def calibrate(
    name: str, llama_bench: list[Path], reports: list[Path], when: str, command: str
) -> tuple[Calibration, str]:
    """Fit every runtime/thread-count group of the given runs; returns the calibration and the key
    of the base profile. ``when`` and ``command`` are recorded in the fit's source."""
    if not llama_bench and not reports:
        raise ConfigError("devices calibrate: give the device's runs: --llama-bench FILE or --report FILE (repeatable)")
    base = get_device(name)
    base_path = device_file(name)
    runs = [r for p in llama_bench for r in runs_from_llama_bench(p)]
    runs += [r for p in reports for r in runs_from_report(p)]
    if not runs:
        raise ConfigError(
            "devices calibrate: no decode runs in "
            + ", ".join(str(p) for p in [*llama_bench, *reports])
            + " (llama-bench: tgN tests with model_size and n_threads)"
        )
    files = ", ".join(Path(p).name for p in [*llama_bench, *reports])
    source = f"fitted by `{command}` on {when} from {files}"
    fits, notes = _fit_runtimes(runs, source)
    machines = sorted({r.machine for _, r in runs if r.machine})
    warnings = []
    if len(machines) > 1:
        warnings.append(
            f"the runs name {len(machines)} CPUs ({'; '.join(machines)}); a fit describes one device, so check "
            "they all come from it (llama-bench and edgeft describe one CPU differently)"
        )
    raw = tomllib.loads(base_path.read_text())
    kept = [
        t
        for t in raw.get("decode_fit", [])
        if (t["runtime"], t["threads"]) not in {(f.runtime, f.threads) for f in fits}
    ]
    threads = base.threads
    if not any(f.threads == threads for f in fits):
        threads = max(fits, key=lambda f: (len(f.runs), f.threads)).threads
        notes.append(f"the profile's thread count is now {threads} (no fit at {base.threads} threads)")
    raw.update(
        name=base.name if base.name.endswith(", calibrated") else f"{base.name}, calibrated",
        threads=threads,
        based_on=base.key if not name.endswith(".toml") else str(base_path),
        decode_fit=kept + [fit_to_table(f) for f in fits],
    )
    header = [
        f"Written by `{command}` on {when}.",
        f"Based on {base_path}: its figures and their sources are kept; the [[decode_fit]] tables below were",
        "fitted from this device's own runs (ms per token = per_token_ms + MB per token / bandwidth_gb_s).",
        "Use it with: edgeft bench --device THIS_FILE (or recommend --device THIS_FILE).",
    ]
    return Calibration(fits, notes, warnings, profile_toml(raw, header), threads), base.key


def _fit_runtimes(runs: list[tuple[str, Any]], source: str) -> tuple[list[Any], list[str]]:
    """One fit per runtime and thread count, and notes on what was skipped or not fitted; refused
    when no runtime could be fitted at all."""
    fits, notes = [], []
    errors = []
    for runtime in sorted({rt for rt, _ in runs}):
        try:
            got, skipped = fit_by_threads([r for rt, r in runs if rt == runtime], runtime, source)
        except ConfigError as e:
            errors.append(str(e))
            continue
        fits += got
        notes += skipped + [f"{runtime}, {f.threads} threads: {f.note}" for f in got if f.note]
    if not fits:
        raise ConfigError(f"devices calibrate: nothing to fit: {'; '.join(errors)}")
    return fits, notes + [f"not fitted: {e}" for e in errors]


def write_profile(out: Path, text: str) -> Path:
    """Write a calibrated profile; a shipped profile is never overwritten (its published sources stay)."""
    out = Path(out)
    if out.suffix != ".toml":
        raise ConfigError(f"--out {out}: a device profile is a .toml file")
    if out.resolve().parent == devices_dir().resolve():
        raise OutputError(f"--out {out}: that is where edgeft's own profiles live; write your profile elsewhere")
    if out.is_dir():
        raise OutputError(f"--out {out}: is a folder")
    write_atomic(out, text)
    _load(out)  # what was written reads back (a bug here, not the user's)
    return out


# --------------------------------------------------------------------------------------------
# TOML (tomllib reads only): the few value types a profile holds


def _value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{where}: {v} has no TOML form")
        return repr(round(v, 6))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON's string escapes are TOML basic-string escapes
    if isinstance(v, list) and all(not isinstance(x, dict) for x in v):
        return "[" + ", ".join(_value(x, where) for x in v) + "]"
    raise ValueError(f"{where}: {type(v).__name__} is not written as a TOML value")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() and k.isascii() else json.dumps(k)


def _table(d: dict[str, Any], name: str, lines: list[str]) -> None:
    for k, v in d.items():
        if not _is_tables(v):
            lines.append(f"{_key(k)} = {_value(v, f'{name}.{k}')}")
    for k, v in d.items():
        if _is_tables(v):
            for item in v:
                lines += ["", f"[[{name + '.' if name else ''}{_key(k)}]]"]
                _table(item, f"{name + '.' if name else ''}{_key(k)}", lines)


def _is_tables(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def profile_toml(raw: dict[str, Any], header: list[str]) -> str:
    """``raw`` (top-level values, then arrays of tables) as TOML text under ``header`` comments."""
    lines = [f"# {safe_text(h)}" for h in header]
    _table(raw, "", lines)
    text = "\n".join(lines) + "\n"
    assert tomllib.loads(text) == json.loads(json.dumps(_rounded(raw))), "profile_toml round trip"
    return text


def _rounded(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_rounded(x) for x in v]
    return v
