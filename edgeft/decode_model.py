"""Decode speed on a device: a fixed cost per token plus the bytes each token reads.

The per-token floor model::

    milliseconds per decoded token  T(b) = t0 + b / B

``b`` is the weight bytes read per token (the GGUF's tensors, the token-embedding table counted as
one row unless it is also the output layer; llama-bench's ``model_size`` for imported runs), ``B``
an effective bandwidth and ``t0`` what a token costs whatever the model's size: graph set-up,
thread hand-offs, sampling, the work on activations. Both belong to one device, one runtime and one
thread count. With ``t0 = 0`` this is the old bandwidth-only projection, a ceiling; for a 135M
model on a desktop core the ceiling was 317 tok/s where llama.cpp measured 111, because a small
model's ``b / B`` is only a few milliseconds and ``t0`` is of the same order.

**Fitting** (:func:`fit`): least squares of measured ms/token on ``b`` over runs of at least two
artifact sizes. A negative intercept (noise, or runs whose compute per byte differs) is refitted
through the origin and says so; a slope ≤ 0 (time not growing with size) is refused.

**Projection** (:func:`project_decode`): never a bare number, always ``low``, ``estimate``, ``high``
and the basis they rest on —

* ``fit``: the device has a fit for this runtime and thread count. ``estimate`` = ``1 / T(b)``; the
  band is ±``uncertainty_pct`` on ``T``: the larger of the fit's worst residual, the widest
  run-to-run spread of the runs it came from, and :data:`MIN_UNCERTAINTY_PCT`. Outside the fitted
  sizes by more than :data:`EXTRAPOLATION` the band is doubled and the basis says so.
* ``prior``: no fit; the profile's published effective bandwidth with a per-token cost taken from
  another device (``per_token_ms_prior``, sourced in the profile). ``estimate`` = ``low`` = with that
  ``t0``; ``high`` = bandwidth only (``t0 = 0``), the old ceiling.
* ``ceiling``: no fit and no prior: only ``high`` (bandwidth only) is known; ``low`` is None.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ConfigError

MIN_UNCERTAINTY_PCT = 5.0  # the narrowest band claimed: repeated runs of one artifact rarely agree closer
EXTRAPOLATION = 1.25  # beyond the fitted sizes ÷ or × this, the band doubles
SAME_SIZE = 0.01  # runs within 1% of each other's bytes count as one artifact size


@dataclass(frozen=True)
class FitRun:
    """One measured decode speed a fit rests on."""

    model: str
    type: str
    size_bytes: int  # bytes read per token as the fit used them
    threads: int
    tok_s: float  # the run's median (or llama-bench's mean)
    spread_pct: float | None = None  # half the run's min-max (or its sd), % of tok_s
    fitted_tok_s: float | None = None
    residual_pct: float | None = None  # (fitted - measured) / measured, %
    source: str | None = None  # the file it came from
    machine: str | None = None  # the CPU the file names


@dataclass(frozen=True)
class DecodeFit:
    """``T(b) = per_token_ms + b / bandwidth`` for one runtime and thread count, with its runs."""

    runtime: str
    threads: int
    per_token_ms: float
    bandwidth_gb_s: float
    uncertainty_pct: float
    source: str
    runs: tuple[FitRun, ...] = field(default_factory=tuple)
    note: str = ""

    def ms_per_token(self, bytes_per_token: float) -> float:
        return self.per_token_ms + bytes_per_token / (self.bandwidth_gb_s * 1e6)

    def tok_s(self, bytes_per_token: float) -> float:
        return 1000.0 / self.ms_per_token(bytes_per_token)

    @property
    def sizes(self) -> tuple[int, int]:
        return min(r.size_bytes for r in self.runs), max(r.size_bytes for r in self.runs)


def distinct_sizes(sizes: list[int]) -> list[int]:
    """The artifact sizes among ``sizes``, runs within :data:`SAME_SIZE` of a smaller one merged."""
    out: list[int] = []
    for s in sorted(sizes):
        if not out or s > out[-1] * (1 + SAME_SIZE):
            out.append(s)
    return out


def fit(runs: list[FitRun], runtime: str, source: str) -> DecodeFit:
    """Least squares of ms/token on bytes/token over ``runs`` (one thread count).

    Raises ConfigError with fewer than two artifact sizes or when time does not grow with size.
    """
    threads = {r.threads for r in runs}
    if len(threads) != 1:
        raise ValueError(f"fit: runs of one thread count expected, got {sorted(threads)}")
    sizes = distinct_sizes([r.size_bytes for r in runs])
    if len(sizes) < 2:
        shown = ", ".join(f"{s / 1e6:.1f} MB" for s in sizes)
        raise ConfigError(
            f"{runtime}, {next(iter(threads))} threads: decode runs of {len(sizes)} artifact size ({shown}); "
            "fitting a per-token cost and a bandwidth needs at least 2 sizes (e.g. a Q8_0 and a Q4_0 file)"
        )
    xs = [r.size_bytes / 1e6 for r in runs]  # MB
    ys = [1000.0 / r.tok_s for r in runs]  # ms
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx  # ms per MB = 1 / (GB/s)
    t0 = my - slope * mx
    if slope <= 0:
        points = "; ".join(f"{r.size_bytes / 1e6:.1f} MB at {r.tok_s:.1f} tok/s" for r in runs)
        raise ConfigError(
            f"{runtime}, {runs[0].threads} threads: decode time does not grow with artifact size in these runs "
            f"({points}), so no bandwidth can be fitted; re-measure (a loaded machine?) or add runs of other sizes"
        )
    note = ""
    if t0 < 0:
        # A negative fixed cost has no meaning: fit the line through the origin (bandwidth only) instead.
        note = f"the free fit gave a negative per-token cost ({t0:.2f} ms); refitted with it fixed at 0"
        slope = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
        t0 = 0.0
    draft = DecodeFit(runtime, runs[0].threads, t0, 1.0 / slope, 0.0, source, (), note)
    fitted = []
    worst = 0.0
    for r in runs:
        f = draft.tok_s(r.size_bytes)
        time_err = abs(1000.0 / r.tok_s - 1000.0 / f) / (1000.0 / f)
        worst = max(worst, 100 * time_err, r.spread_pct or 0.0)
        fitted.append(replace(r, fitted_tok_s=f, residual_pct=100 * (f - r.tok_s) / r.tok_s))
    return replace(draft, uncertainty_pct=max(MIN_UNCERTAINTY_PCT, worst), runs=tuple(fitted))


def fit_by_threads(runs: list[FitRun], runtime: str, source: str) -> tuple[list[DecodeFit], list[str]]:
    """One fit per thread count that has runs of two sizes or more; the others named in the notes.

    Raises ConfigError naming every thread count's problem when none can be fitted."""
    fits, notes = [], []
    for threads in sorted({r.threads for r in runs}):
        try:
            fits.append(fit([r for r in runs if r.threads == threads], runtime, source))
        except ConfigError as e:
            notes.append(str(e))
    if not fits:
        raise ConfigError("; ".join(notes))
    return fits, [f"not fitted: {n}" for n in notes]


def project_decode(
    bytes_per_token: int,
    fit_: DecodeFit | None,
    effective_bandwidth_gb_s: float,
    prior_ms: float | None,
) -> dict[str, Any]:
    """Decode tok/s on a device as ``{low, estimate, high, ceiling, basis, per_token_ms,
    bandwidth_gb_s, extrapolated}`` (see the module docstring); every figure is a projection."""
    if not bytes_per_token or bytes_per_token <= 0:
        return {"low": None, "estimate": None, "high": None, "ceiling": None, "basis": "none"}
    ceiling = effective_bandwidth_gb_s * 1e9 / bytes_per_token
    if fit_ is not None:
        t = fit_.ms_per_token(bytes_per_token)
        lo, hi = fit_.sizes
        extrapolated = bytes_per_token < lo / EXTRAPOLATION or bytes_per_token > hi * EXTRAPOLATION
        u = fit_.uncertainty_pct / 100 * (2 if extrapolated else 1)
        return {
            "low": 1000.0 / (t * (1 + u)),
            "estimate": 1000.0 / t,
            "high": 1000.0 / (t * (1 - u)) if u < 1 else None,
            "ceiling": fit_.bandwidth_gb_s * 1e9 / bytes_per_token,
            "basis": "fit",
            "per_token_ms": fit_.per_token_ms,
            "bandwidth_gb_s": fit_.bandwidth_gb_s,
            "uncertainty_pct": 100 * u,
            "extrapolated": extrapolated,
            "fitted_sizes_bytes": [lo, hi],
        }
    if prior_ms is not None:
        est = 1000.0 / (prior_ms + bytes_per_token / (effective_bandwidth_gb_s * 1e6))
        return {
            "low": est,
            "estimate": est,
            "high": ceiling,
            "ceiling": ceiling,
            "basis": "prior",
            "per_token_ms": prior_ms,
            "bandwidth_gb_s": effective_bandwidth_gb_s,
        }
    return {
        "low": None,
        "estimate": ceiling,
        "high": ceiling,
        "ceiling": ceiling,
        "basis": "ceiling",
        "per_token_ms": None,
        "bandwidth_gb_s": effective_bandwidth_gb_s,
    }


def describe_range(p: dict[str, Any], digits: str = "{:.1f}") -> str:
    """``25.6 [24.3–26.9]`` (fit), ``20.1–24.7`` (prior), ``≤ 69.0`` (ceiling), ``n/a``."""
    if p.get("estimate") is None:
        return "n/a"
    f = digits.format
    if p.get("basis") == "ceiling" or p.get("low") is None:
        return f"≤ {f(p['estimate'] if p.get('high') is None else p['high'])}"
    if p.get("basis") == "prior" and p.get("high") is not None:
        return f"{f(p['low'])}–{f(p['high'])}"
    high = "?" if p.get("high") is None else f(p["high"])
    return f"{f(p['estimate'])} [{f(p['low'])}–{high}]"


# --------------------------------------------------------------------------------------------
# a fit as a profile's ``[[decode_fit]]`` table (and its ``[[decode_fit.runs]]``)

_FIT_KEYS = {
    "runtime": "a runtime name (llama.cpp)",
    "threads": "a thread count (integer >= 1)",
    "per_token_ms": "milliseconds (a number >= 0)",
    "bandwidth_gb_s": "GB/s (a number > 0)",
    "uncertainty_pct": "a percentage (a number >= 0)",
    "source": "where the runs come from (a non-empty string)",
}
_RUN_KEYS = {
    "model": "a model name or file (a string)",
    "type": "its quantization (a string)",
    "size_bytes": "bytes read per token (an integer > 0)",
    "threads": "a thread count (integer >= 1)",
    "tok_s": "decode tokens/s (a number > 0)",
}
_RUN_OPTIONAL = ("spread_pct", "fitted_tok_s", "residual_pct", "source", "machine")


def _check(value: Any, what: str) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    if what.startswith("a thread count"):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if what.startswith("bytes"):
        return isinstance(value, int) and not isinstance(value, bool) and value > 0
    if "(a number > 0)" in what:
        return number and 0 < value < float("inf")
    if "(a number >= 0)" in what:
        return number and 0 <= value < float("inf")
    return isinstance(value, str) and bool(value.strip())


_FLOATS = ("tok_s", "spread_pct", "fitted_tok_s", "residual_pct")


def _optional_ok(key: str, v: Any) -> bool:
    if key in ("source", "machine"):
        return isinstance(v, str)
    finite = isinstance(v, int | float) and not isinstance(v, bool) and abs(v) < float("inf") and v == v
    return finite and (key == "residual_pct" or v >= 0)


def fit_from_table(table: Any, where: str) -> DecodeFit:
    """A ``[[decode_fit]]`` table of a profile, checked; ``where`` names it in errors."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table ([[decode_fit]]), got {type(table).__name__}")
    unknown = set(table) - set(_FIT_KEYS) - {"note", "runs"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {sorted(unknown)[0]!r}; expected {', '.join([*_FIT_KEYS, 'note', 'runs'])}"
        )
    for key, what in _FIT_KEYS.items():
        if key not in table:
            raise ConfigError(f"{where}: missing key {key!r} ({what})")
        if not _check(table[key], what):
            raise ConfigError(f"{where}.{key}: expected {what}, got {table[key]!r:.60}")
    if not isinstance(table.get("note", ""), str):
        raise ConfigError(f"{where}.note: expected a string, got {table['note']!r:.60}")
    runs_raw = table.get("runs")
    if not isinstance(runs_raw, list) or not runs_raw:
        raise ConfigError(f"{where}.runs: expected the runs the fit came from ([[decode_fit.runs]] tables)")
    runs = []
    for i, run in enumerate(runs_raw):
        at = f"{where}.runs[{i}]"
        if not isinstance(run, dict):
            raise ConfigError(f"{at}: expected a table, got {type(run).__name__}")
        unknown = set(run) - set(_RUN_KEYS) - set(_RUN_OPTIONAL)
        if unknown:
            raise ConfigError(
                f"{at}: unknown key {sorted(unknown)[0]!r}; expected {', '.join([*_RUN_KEYS, *_RUN_OPTIONAL])}"
            )
        for key, what in _RUN_KEYS.items():
            if key not in run or not _check(run[key], what):
                raise ConfigError(f"{at}.{key}: expected {what}, got {run.get(key)!r:.60}")
        for key in _RUN_OPTIONAL:
            v = run.get(key)
            if v is not None and not _optional_ok(key, v):
                expected = "a string" if key in ("source", "machine") else "a finite number"
                raise ConfigError(f"{at}.{key}: expected {expected}, got {v!r:.60}")
        runs.append(FitRun(**{k: float(v) if k in _FLOATS else v for k, v in run.items()}))
    if len(distinct_sizes([r.size_bytes for r in runs])) < 2:
        raise ConfigError(f"{where}.runs: a fit needs runs of at least 2 artifact sizes")
    return DecodeFit(
        runtime=table["runtime"],
        threads=table["threads"],
        per_token_ms=float(table["per_token_ms"]),
        bandwidth_gb_s=float(table["bandwidth_gb_s"]),
        uncertainty_pct=float(table["uncertainty_pct"]),
        source=table["source"],
        runs=tuple(runs),
        note=table.get("note", ""),
    )


def fit_to_table(f: DecodeFit) -> dict[str, Any]:
    """The ``[[decode_fit]]`` table for ``f`` (what :func:`fit_from_table` reads back)."""
    out: dict[str, Any] = {k: getattr(f, k) for k in _FIT_KEYS}
    if f.note:
        out["note"] = f.note
    out["runs"] = [{k: v for k in (*_RUN_KEYS, *_RUN_OPTIONAL) if (v := getattr(r, k)) is not None} for r in f.runs]
    return out
