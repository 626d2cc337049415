"""The statistics behind verdicts (edgeft/bench/stats.py), against hand-computed values and simulations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeft.bench.stats import (
    bootstrap_ratio,
    describe_paired,
    mcnemar_exact,
    mover_change,
    paired_accuracy,
    paired_bootstrap_change,
    paired_difference_interval,
    verdict,
)

# --------------------------------------------------------------------------------- exact McNemar


@pytest.mark.parametrize(
    "b, c, expected",
    [
        # 1 and 7 discordant pairs: 2 · (C(8,0) + C(8,1)) / 2^8 = 18/256
        (1, 7, 18 / 256),
        # 6 and 16: 2 · Σ_{i≤6} C(22,i) / 2^22 = 2 · 110056 / 4194304
        (6, 16, 2 * 110056 / 4194304),
        (0, 5, 2 / 32),
        (0, 0, 1.0),  # nothing flipped: no evidence either way
        (4, 4, 1.0),  # a balanced table caps at 1
    ],
)
def test_exact_mcnemar_on_hand_made_tables(b, c, expected):
    assert math.isclose(mcnemar_exact(b, c), expected, rel_tol=1e-12)
    assert mcnemar_exact(c, b) == mcnemar_exact(b, c)


# ------------------------------------------------------------------------------- Bonett–Price


def test_bonett_price_interval_by_hand():
    # 161 pairs, 6 right→wrong, 16 wrong→right: Laplace-adjusted 7/163 and 17/163,
    # SE = sqrt((24/163 − (10/163)²) / 163) = 0.0296687, centre 10/163 = 0.0613497.
    lo, hi = paired_difference_interval(6, 16, 161)
    assert lo == pytest.approx(0.0613497 - 1.959964 * 0.0296687, abs=1e-6)
    assert hi == pytest.approx(0.0613497 + 1.959964 * 0.0296687, abs=1e-6)
    assert lo == pytest.approx(0.00320, abs=1e-5) and hi == pytest.approx(0.11950, abs=1e-5)


def test_no_flips_still_leaves_an_interval_that_narrows_with_more_questions():
    lo78, hi78 = paired_difference_interval(0, 0, 78)
    assert lo78 == pytest.approx(-hi78) and hi78 == pytest.approx(1.959964 * math.sqrt(2 / 80) / math.sqrt(80))
    assert 0.03 < hi78 < 0.04  # 78 questions cannot rule out a 3-point change, even with no flip
    assert paired_difference_interval(0, 0, 780)[1] < hi78 / 3


@pytest.mark.parametrize(
    "b, c, n, says",
    [
        (1, 4, 78, "within noise"),  # the demo's 66.7% → 70.5%: +3 net flips
        (3, 0, 78, "within noise"),  # 3 lost, none gained: not enough to call
        (20, 1, 60, "a real drop"),
        (0, 12, 60, "a real gain"),
    ],
)
def test_interval_covers_or_excludes_zero_as_the_flips_say(b, c, n, says):
    iv = paired_difference_interval(b, c, n)
    assert verdict(iv) == says
    assert iv[0] <= (c - b) / n <= iv[1]


def test_bonett_price_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    n, p_lost, p_gained = 78, 0.06, 0.02
    tables = rng.multinomial(n, [p_lost, p_gained, 1 - p_lost - p_gained], size=4000)
    truth = p_gained - p_lost
    covered = sum(lo <= truth <= hi for lo, hi in (paired_difference_interval(b, c, n) for b, c, _ in tables))
    assert 0.93 <= covered / len(tables) <= 0.985


def test_paired_accuracy_counts_the_table_both_ways():
    ref = [True, True, True, False, False, True, False, True]
    art = [True, False, True, True, False, False, False, True]
    p = paired_accuracy(ref, art)
    assert (p["both_right"], p["right_to_wrong"], p["wrong_to_right"], p["both_wrong"]) == (3, 2, 1, 2)
    assert p["n"] == 8 and p["difference"] == pytest.approx(-1 / 8)
    assert p["p_value"] == pytest.approx(mcnemar_exact(2, 1))
    assert p["interval"] == list(paired_difference_interval(2, 1, 8))
    assert "Bonett–Price" in p["method"] and "McNemar" in p["method"]
    text = describe_paired(p)
    assert "2 went right→wrong and 1 wrong→right" in text and "95% CI" in text and "within noise" in text
    with pytest.raises(ValueError):
        paired_accuracy([True], [True, False])


# ---------------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_reproducible_with_its_seed():
    rng = np.random.default_rng(0)
    sums, counts = rng.exponential(size=40) * 30, rng.integers(10, 50, size=40)
    first = bootstrap_ratio(sums, counts)
    assert first == bootstrap_ratio(sums, counts)
    assert first != bootstrap_ratio(sums, counts, seed=1)
    point = sums.sum() / counts.sum()
    assert first[0] < point < first[1]
    assert bootstrap_ratio([], []) is None


def test_bootstrap_resamples_sequences_not_tokens():
    # 20 replies of 50 tokens: half the replies diverge on every token (KLD 1), half on none.
    # Per token that looks like 1000 independent draws (±3 points); it is 20.
    counts = np.full(20, 50)
    sums = np.where(np.arange(20) % 2 == 0, 50.0, 0.0)
    lo, hi = bootstrap_ratio(sums, counts)
    token_half_width = 1.96 * math.sqrt(0.25 / 1000)
    assert hi - lo > 5 * 2 * token_half_width
    assert lo < 0.5 < hi
    # a figure that every sequence shares has no spread to resample
    assert bootstrap_ratio(counts * 0.2, counts) == pytest.approx((0.2, 0.2))


def test_paired_bootstrap_change_sees_a_small_shift_that_unpaired_intervals_miss():
    rng = np.random.default_rng(2)
    counts = rng.integers(20, 60, size=50)
    old = rng.exponential(size=50) * counts * 0.05  # sequences differ a lot from one another
    new = old * 1.1  # every sequence 10% worse
    change, (lo, hi) = paired_bootstrap_change(old, new, counts)
    assert change > 0 and lo > 0
    # the same two figures compared unpaired (MOVER from each one's own interval) span zero
    o, n = old.sum() / counts.sum(), new.sum() / counts.sum()
    mlo, _ = mover_change(o, bootstrap_ratio(old, counts), n, bootstrap_ratio(new, counts))
    assert mlo < 0
    assert paired_bootstrap_change(old, old, counts) == (0.0, (0.0, 0.0))


def test_mover_by_hand():
    lo, hi = mover_change(0.05, (0.04, 0.06), 0.08, (0.07, 0.10))
    assert lo == pytest.approx(0.03 - math.sqrt(0.01**2 + 0.01**2))
    assert hi == pytest.approx(0.03 + math.sqrt(0.02**2 + 0.01**2))
