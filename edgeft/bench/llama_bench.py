"""llama.cpp's own benchmark as measured device rows: ``llama-bench -o json`` (or ``-o jsonl``).

A user who benchmarked on a phone or a Pi with llama-bench should not have to re-run anything to see
those figures next to the build's. llama-bench prints one object per test (``pp512``: ``n_prompt``
512, ``n_gen`` 0; ``tg128``: ``n_prompt`` 0, ``n_gen`` 128; ``pp512+tg128`` and ``@ d…`` depth tests
too), and its fields change between builds, so everything here is read by name, unknown fields are
ignored and only ``avg_ts`` plus the two token counts are required.

A row is matched to a build's GGUF target by ``model_size``: llama-bench reports the bytes of the
model's tensors (``llama_model_size``), which is the sum of the tensor sizes in the GGUF file, a
figure two different quantizations of one model do not share. The file name cannot be used: every
target's artifact is called ``model.gguf``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..loading import parse_json, read_text

SOURCE = "llama-bench"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The test objects of a ``-o json`` array or a ``-o jsonl`` file (one object per line)."""
    path = Path(path)
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"--llama-bench {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--llama-bench {path}: cannot read ({e})") from None
    records: list[Any]
    try:
        records = parse_json(text)
        if isinstance(records, dict):
            records = [records]
        where = [f"{path}: test {i + 1}" for i in range(len(records) if isinstance(records, list) else 0)]
    except json.JSONDecodeError as whole_error:
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(parse_json(line))
            except json.JSONDecodeError:
                # Report the error of the reading that got further: a JSON array broken on line 9
                # is better described by the array parse than by "line 2 is not an object".
                if n == 1 or text.lstrip().startswith("["):
                    raise ConfigError(
                        f"{path}:{whole_error.lineno}: not llama-bench JSON ({whole_error.msg}); "
                        "expected the output of `llama-bench -o json` or `-o jsonl`"
                    ) from None
                raise ConfigError(f"{path}:{n}: not a JSON object (expected one llama-bench test per line)") from None
            where.append(f"{path}:{n}")
    if not isinstance(records, list) or not records:
        raise ConfigError(f"{path}: no llama-bench tests in it (expected a JSON array of test objects)")
    for rec, loc in zip(records, where):
        _check_record(rec, loc)
    return records


def _check_record(rec: Any, where: str) -> None:
    if not isinstance(rec, dict):
        raise ConfigError(f"{where}: expected a JSON object with llama-bench's fields, got {type(rec).__name__}")
    for key in ("n_prompt", "n_gen"):
        if not isinstance(rec.get(key), int) or isinstance(rec.get(key), bool) or rec[key] < 0:
            raise ConfigError(f"{where}: {key}: expected a token count (integer ≥ 0), got {_shown(rec.get(key))}")
    if rec["n_prompt"] == 0 and rec["n_gen"] == 0:
        raise ConfigError(f"{where}: n_prompt and n_gen are both 0; not a llama-bench test")
    if not _positive_number(rec.get("avg_ts")):
        raise ConfigError(
            f"{where}: avg_ts: expected tokens per second (a number > 0), got {_shown(rec.get('avg_ts'))}"
        )
    samples = rec.get("samples_ts")
    if samples is not None and (not isinstance(samples, list) or not all(_positive_number(s) for s in samples)):
        raise ConfigError(f"{where}: samples_ts: expected a list of tokens per second, got {_shown(samples)}")
    # The optional fields the import reads (unknown ones are ignored): absent or null, else this type.
    # A wrong type would otherwise surface as a crash far from the file (a list as a grouping key).
    for key, (ok, expected) in _OPTIONAL.items():
        value = rec.get(key)
        if value is not None and not ok(value):
            raise ConfigError(f"{where}: {key}: expected {expected}, got {_shown(value)}")


def _positive_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and x == x and x != float("inf")


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _finite_non_negative(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < float("inf")


_TEXT = (lambda x: isinstance(x, str), "a string")
_OPTIONAL: dict[str, tuple[Any, str]] = {
    "model_filename": _TEXT,
    "model_type": _TEXT,
    "model_size": (_count, "a byte count (integer >= 0)"),
    "n_threads": (_count, "a thread count (integer >= 0)"),
    "n_depth": (_count, "a token count (integer >= 0)"),
    "stddev_ts": (_finite_non_negative, "a number >= 0"),
    "cpu_info": _TEXT,
    "gpu_info": _TEXT,
    "backends": _TEXT,
    "test_time": _TEXT,
    "build_commit": _TEXT,
    "build_number": (_count, "a build number (integer >= 0)"),
}


def _shown(value: Any, limit: int = 80) -> str:
    """A value's repr cut short: the error line names it, it does not reprint a hostile file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def speed(rec: dict[str, Any]) -> dict[str, Any]:
    """A test's tokens/s in the report's shape (median [min–max] of the samples) plus llama-bench's
    own mean ± standard deviation; without samples (older builds) only the mean is known."""
    samples = [float(s) for s in rec.get("samples_ts") or []]
    out: dict[str, Any] = {"mean": float(rec["avg_ts"]), "stddev": _float_or_none(rec.get("stddev_ts"))}
    if samples:
        out.update(median=statistics.median(samples), min=min(samples), max=max(samples), samples=len(samples))
    return out


def _float_or_none(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _kind(rec: dict[str, Any]) -> str:
    if rec.get("n_depth"):
        return "other"  # a test at depth (a filled KV cache) is not the plain prefill/decode figure
    if rec["n_gen"] == 0:
        return "prefill"
    if rec["n_prompt"] == 0:
        return "decode"
    return "other"


def _test_name(rec: dict[str, Any]) -> str:
    parts = [f"pp{rec['n_prompt']}" if rec["n_prompt"] else "", f"tg{rec['n_gen']}" if rec["n_gen"] else ""]
    name = "+".join(p for p in parts if p)
    return f"{name} @ d{rec['n_depth']}" if rec.get("n_depth") else name


def device_run(path: Path, targets: dict[str, int], imported_at: str) -> dict[str, Any]:
    """llama-bench's tests → one device run record (see :mod:`edgeft.bench.device_runs`).

    ``targets`` maps a build's GGUF target names to their tensor bytes. Tests are grouped by model
    and thread count; each group becomes one row with its prefill and decode test (the last one of
    each kind when a file repeats a test), and the rest listed under ``other_tests``.
    """
    records = read_records(path)
    by_size = {size: name for name, size in targets.items()}
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rec in records:
        key = (rec.get("model_filename"), rec.get("model_size"), rec.get("n_threads"), rec.get("cpu_info"))
        row = groups.setdefault(
            key,
            {
                "target": by_size.get(rec.get("model_size")),
                "model": rec.get("model_filename"),
                "model_type": rec.get("model_type"),
                "size_bytes": rec.get("model_size"),
                "threads": rec.get("n_threads"),
                "runtime": f"llama-bench {_runtime(rec)}",
                "prefill": None,
                "decode": None,
                "other_tests": [],
                "peak_rss_bytes": None,
                "kl_divergence_mean": None,
                "task_accuracy": None,
            },
        )
        kind = _kind(rec)
        entry = {"test": _test_name(rec), "tokens": rec["n_prompt"] + rec["n_gen"], "tok_s": speed(rec)}
        if kind == "other":
            row["other_tests"].append(entry)
        else:
            row[kind] = entry
    first = records[0]
    cpus = sorted({str(r.get("cpu_info")) for r in records if r.get("cpu_info")})
    return {
        "source": SOURCE,
        "file": str(Path(path).resolve()),
        "imported_at": imported_at,
        "measured_at": first.get("test_time"),
        "machine": {
            "cpu_model": "; ".join(cpus) or None,
            "gpu": first.get("gpu_info") or None,
            "backends": first.get("backends"),
            "runtime_builds": {SOURCE: _runtime(first)},
        },
        "rows": list(groups.values()),
    }


def _runtime(rec: dict[str, Any]) -> str:
    build = rec.get("build_number")
    commit = rec.get("build_commit")
    if build is None and commit is None:
        return "build not recorded"
    return f"build {build} ({commit})" if commit else f"build {build}"
