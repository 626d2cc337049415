"""Statistics shared by the benchmark modules: the spread of timings, and what verdicts rest on.

Timings are reported as median [min–max] of repetitions (:func:`spread`).

Task accuracy is paired: the reference and an artifact answer the *same* questions, so all that can
differ are the questions one gets right and the other wrong (the discordant pairs, "flips"):
``b`` right → wrong and ``c`` wrong → right out of ``n``; the difference artifact − reference is
``(c − b) / n``. Two numbers each with a binomial error of ±10 points on 78 questions say nothing; the
flips say how much of the difference is noise.

* Test: the **exact McNemar test**, the binomial test on the discordant pairs (with no difference
  each flip goes either way with probability ½, so ``b ~ Binomial(b + c, ½)``); two-sided
  ``p = min(1, 2·P(X ≤ min(b, c)))``. Exact, so it holds for the handful of flips a small eval set has.
* Interval for the difference: **Bonett–Price's adjusted Wald interval** (Bonett & Price 2012): the
  Wald interval on the Laplace-adjusted discordant proportions ``(b + 1)/(n + 2)`` and
  ``(c + 1)/(n + 2)``. Closed form, one of the intervals Fagerland, Lydersen & Laake recommend for
  paired proportions ("Recommended tests and confidence intervals for paired binomial proportions",
  Stat Med 2014) for its coverage at small n, and, unlike the plain Wald interval, not a point when
  nothing flipped (no flip in 78 questions still leaves ±3.5 points). Newcombe's hybrid score and
  Tango's score intervals do as well but need the marginals or an iterative solve.
* Intervals for mean KL divergence and top-1 agreement: a **percentile bootstrap over sequences**
  (held-out conversations), not tokens. Tokens of one reply are strongly correlated (a reply the
  artifact gets wrong is wrong for many tokens in a row), so a per-token standard error pretends the
  sample is some hundred times larger than it is. Each resample draws whole sequences with
  replacement and recomputes the token-weighted mean (Σ per-sequence sums ÷ Σ positions). The seed
  is fixed, so a report is reproducible from its per-sequence sums.
* Comparing two reports' figures: paired when both measured the same sequences (the same bootstrap
  draws applied to both), else **MOVER** (Zou & Donner 2008), the interval of a difference of two
  independent estimates recovered from their own intervals; on the same eval set the estimates are
  positively correlated, so MOVER is then conservative (it calls fewer regressions).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95
Z = 1.959963984540054  # the standard normal's 97.5th percentile, for 95% two-sided intervals
RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by < 5% of its width between seeds
SEED = 0

PAIRED_METHOD = "exact McNemar test; Bonett–Price adjusted Wald 95% interval"
BOOTSTRAP_METHOD = f"percentile bootstrap over sequences, {RESAMPLES} resamples, seed {SEED}"


def spread(values: list[float]) -> dict[str, float]:
    """Median with min and max, the form every benchmark number is reported in."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (1.0 when there are none)."""
    m, k = b + c, min(b, c)
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return min(1.0, 2.0 * tail)


def paired_difference_interval(b: int, c: int, n: int, z: float = Z) -> tuple[float, float]:
    """Bonett–Price 95% interval for ``(c − b) / n``: the change from the first to the second of a pair
    (``b`` right → wrong, ``c`` wrong → right, ``n`` pairs), clipped to [-1, 1]."""
    if n <= 0:
        raise ValueError("paired_difference_interval: no pairs")
    p_lost, p_gained = (b + 1) / (n + 2), (c + 1) / (n + 2)
    centre = p_gained - p_lost
    se = math.sqrt((p_lost + p_gained - centre**2) / (n + 2))
    return max(-1.0, centre - z * se), min(1.0, centre + z * se)


def paired_accuracy(before: Sequence[bool], after: Sequence[bool]) -> dict[str, Any]:
    """Right/wrong of ``before`` (the reference, or an older artifact) and ``after`` on the same questions,
    in the same order: the 2×2 table, the accuracy difference after − before, its 95% interval and the
    exact McNemar p-value. JSON-ready (the report stores it as is)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_accuracy: {len(before)} and {len(after)} answers; expected the same, > 0")
    pairs = [(bool(x), bool(y)) for x, y in zip(before, after)]
    n = len(pairs)
    both_right = sum(x and y for x, y in pairs)
    lost = sum(x and not y for x, y in pairs)
    gained = sum(y and not x for x, y in pairs)
    lo, hi = paired_difference_interval(lost, gained, n)
    return {
        "n": n,
        "both_right": both_right,
        "right_to_wrong": lost,
        "wrong_to_right": gained,
        "both_wrong": n - both_right - lost - gained,
        "difference": (gained - lost) / n,
        "interval": [lo, hi],
        "confidence": CONFIDENCE,
        "p_value": mcnemar_exact(lost, gained),
        "method": PAIRED_METHOD,
    }


def verdict(interval: Sequence[float]) -> str:
    """What a 95% interval of a change says: a real drop, a real gain, or no difference it can tell."""
    lo, hi = interval
    if hi < 0:
        return "a real drop"
    if lo > 0:
        return "a real gain"
    return "within noise"


def _draws(sequences: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, sequences] indices of whole sequences drawn with replacement."""
    return np.random.default_rng(seed).integers(0, sequences, size=(resamples, sequences))


def _ends(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return float(lo), float(hi)


def bootstrap_ratio(
    sums: Sequence[float],
    counts: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float] | None:
    """Percentile interval of Σ sums ÷ Σ counts, resampling whole sequences (the i-th sum and count
    belong to sequence i). None without sequences."""
    s, c = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if len(s) == 0 or len(s) != len(c):
        return None
    idx = _draws(len(s), resamples, seed)
    return _ends(s[idx].sum(1) / c[idx].sum(1), confidence)


def paired_bootstrap_change(
    old_sums: Sequence[float],
    new_sums: Sequence[float],
    counts: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, tuple[float, float]]:
    """The change new − old of Σ sums ÷ Σ counts measured on the same sequences, and its percentile
    interval: every resample draws the same sequences for both."""
    o, w, c = (np.asarray(a, dtype=np.float64) for a in (old_sums, new_sums, counts))
    idx = _draws(len(c), resamples, seed)
    den = c[idx].sum(1)
    change = float(w.sum() / c.sum() - o.sum() / c.sum())
    return change, _ends(w[idx].sum(1) / den - o[idx].sum(1) / den, confidence)


def mover_change(
    old: float, old_interval: Sequence[float], new: float, new_interval: Sequence[float]
) -> tuple[float, float]:
    """MOVER interval of new − old from each estimate's own interval (independent estimates)."""
    (o_lo, o_hi), (n_lo, n_hi) = old_interval, new_interval
    change = new - old
    return (
        change - math.sqrt((new - n_lo) ** 2 + (o_hi - old) ** 2),
        change + math.sqrt((n_hi - new) ** 2 + (old - o_lo) ** 2),
    )


def describe_paired(p: dict[str, Any], before: str = "reference") -> str:
    """One line for people: ``p`` (from :func:`paired_accuracy`) with its interval, flips and verdict."""
    lo, hi = p["interval"]
    return (
        f"difference {100 * p['difference']:+.1f} pts (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}); of {p['n']} "
        f"questions {p['right_to_wrong']} went right→wrong and {p['wrong_to_right']} wrong→right vs the {before}, "
        f"exact McNemar p = {p['p_value']:.2g}: {verdict(p['interval'])}"
    )
