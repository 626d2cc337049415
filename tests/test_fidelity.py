import math

import numpy as np
import pytest

from edgeft.bench.fidelity import FidelityAccumulator, Sequence, log_softmax, perplexity
from edgeft.bench.gates import evaluate_gates
from edgeft.config import GatesConfig


def test_identical_logits_give_zero_kld_full_agreement():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    acc = FidelityAccumulator()
    acc.add(Sequence(tokens=[1, 2, 3, 4, 5, 6], targets=[3, 4, 5]), logits, logits)
    r = acc.result()
    assert r["kl_divergence_mean"] < 1e-12 and r["top1_agreement"] == 1.0 and r["perplexity_delta_pct"] == 0.0


def test_hand_computed_kld_ppl_and_top1():
    # Two-token vocabulary: reference p = (0.6, 0.4), artifact q = (0.1, 0.9); the target is token 1.
    ref = np.log(np.array([[0.6, 0.4], [0.6, 0.4]]))
    art = np.log(np.array([[0.1, 0.9], [0.1, 0.9]]))
    acc = FidelityAccumulator()
    acc.add(Sequence(tokens=[0, 1], targets=[1]), ref, art)
    r = acc.result()
    expected = 0.6 * math.log(0.6 / 0.1) + 0.4 * math.log(0.4 / 0.9)
    assert math.isclose(r["kl_divergence_mean"], expected, rel_tol=1e-9)
    assert math.isclose(r["perplexity_reference"], 2.5) and math.isclose(r["perplexity_artifact"], 1 / 0.9)
    assert r["top1_agreement"] == 0.0


def test_log_softmax_is_normalised():
    x = np.array([[1000.0, 1001.0, 999.0]])
    assert math.isclose(np.exp(log_softmax(x)).sum(), 1.0)


def test_perplexity_error():
    ppl, err = perplexity([1.0, 1.0, 1.0])
    assert math.isclose(ppl, math.e) and err == 0.0


def _entry(**over):
    entry = {
        "target": "gguf-q4",
        "fidelity": {
            "kl_divergence_mean": 0.2,
            "kl_divergence_se": 0.01,
            "top1_agreement": 0.8,
            "perplexity_delta_pct": 5.0,
            "perplexity_artifact": 2.0,
            "perplexity_artifact_err": 0.05,
            "task_accuracy_artifact": 0.6,
            "task_accuracy_reference": 0.8,
        },
        "latency": {"decode_tok_s": 50.0, "artifact": {"decode_tok_s": {"median": 50.0, "min": 48.0, "max": 52.0}}},
        "memory": {"peak_rss_bytes": 200e6},
        "artifact": {"size_bytes": 100e6},
        "golden": [{"artifact_stopped": True, "artifact_correct": False}],
        "answers": [{}] * 50,
    }
    for k, v in over.items():
        entry[k] = {**entry[k], **v} if isinstance(v, dict) else v
    return entry


def test_gates_pass_and_fail():
    gates = evaluate_gates(
        _entry(),
        GatesConfig(
            max_kld=0.1,
            min_top1=0.5,
            min_task_accuracy_ratio=0.7,
            max_size_mb=150,
            max_peak_rss_mb=150,
            golden_must_stop=True,
            golden_must_be_correct=True,
        ),
    )
    by = {g["name"]: g["passed"] for g in gates}
    assert by == {
        "max_kld": False,
        "min_top1": True,
        "min_task_accuracy_ratio": True,
        "max_size_mb": True,
        "max_peak_rss_mb": False,
        "golden_must_stop": True,
        "golden_must_be_correct": False,
    }
    assert evaluate_gates(_entry(), GatesConfig()) == []


def test_gate_flags_override_config():
    import pytest

    from edgeft.bench.gates import parse_gate_flags
    from edgeft.errors import ConfigError

    g = parse_gate_flags(("max_kld=0.05", "golden_must_stop=true"), GatesConfig(min_top1=0.9))
    assert g.max_kld == 0.05 and g.golden_must_stop is True and g.min_top1 == 0.9
    with pytest.raises(ConfigError, match="NAME one of"):
        parse_gate_flags(("max_kdl=1",), GatesConfig())
    with pytest.raises(ConfigError, match="expected a number"):
        parse_gate_flags(("max_kld=low",), GatesConfig())


def test_regressions_beyond_the_spread_only():
    from edgeft.bench.gates import regressions

    old = {"targets": [_entry()]}
    same = {"targets": [_entry(fidelity={"kl_divergence_mean": 0.21})]}  # within 2 SE
    assert regressions(same, old) == []
    worse = {
        "targets": [
            _entry(
                fidelity={"kl_divergence_mean": 0.3, "perplexity_artifact": 2.5},
                latency={"artifact": {"decode_tok_s": {"median": 30.0, "min": 29.0, "max": 31.0}}},
            )
        ]
    }
    assert {r["metric"] for r in regressions(worse, old)} == {
        "kl_divergence_mean",
        "perplexity_artifact",
        "decode_tok_s",
    }


def _stored_vs_exact(k: int, vocab: int = 40, n: int = 12):
    from edgeft.bench.reference import topk_of

    rng = np.random.default_rng(1)
    ref = rng.normal(scale=3, size=(n, vocab))
    art = ref + rng.normal(scale=0.5, size=(n, vocab))
    seq = Sequence(tokens=list(rng.integers(0, vocab, size=n)), targets=list(range(1, n)))
    pos = [t - 1 for t in seq.targets]
    exact = FidelityAccumulator()
    exact.add(seq, ref, art)
    ids, logp = topk_of(ref, pos, k)
    target_logp = log_softmax(ref[pos])[np.arange(len(pos)), np.asarray(seq.tokens)[seq.targets]]
    approx = FidelityAccumulator()
    approx.add_topk(seq, ids, logp, target_logp, art)
    return exact.result(), approx.result()


def test_topk_kld_with_full_k_is_exact():
    exact, approx = _stored_vs_exact(k=40)
    assert math.isclose(approx["kl_divergence_mean"], exact["kl_divergence_mean"], rel_tol=1e-6)
    assert approx["top1_agreement"] == exact["top1_agreement"]
    assert math.isclose(approx["perplexity_artifact"], exact["perplexity_artifact"], rel_tol=1e-9)
    assert math.isclose(approx["perplexity_reference"], exact["perplexity_reference"], rel_tol=1e-9)


def test_topk_kld_is_a_close_lower_bound():
    exact, approx = _stored_vs_exact(k=8)
    assert approx["kl_divergence_mean"] <= exact["kl_divergence_mean"] + 1e-12
    assert approx["kl_divergence_mean"] > 0.5 * exact["kl_divergence_mean"]
    assert approx["top1_agreement"] == exact["top1_agreement"]


def test_stored_reference_round_trip(tmp_path):
    from edgeft.bench.reference import load, save

    arrays = {
        "tokens": [np.arange(5, dtype=np.int32), np.arange(3, dtype=np.int32)],
        "targets": [np.array([3, 4], dtype=np.int32), np.array([2], dtype=np.int32)],
        "topk_ids": [np.zeros((2, 4), np.int32), np.ones((1, 4), np.int32)],
        "topk_logp": [np.zeros((2, 4), np.float32), np.zeros((1, 4), np.float32)],
        "target_logp": [np.zeros(2, np.float32), np.zeros(1, np.float32)],
    }
    save(tmp_path, arrays, {"top_k": 4, "examples": []})
    stored = load(tmp_path)
    assert stored.k == 4 and [s.targets for s in stored.sequences()] == [[3, 4], [2]]
    assert stored.topk_ids[1].shape == (1, 4)


def test_fidelity_keeps_per_sequence_sums_and_intervals_over_sequences():
    rng = np.random.default_rng(3)
    acc = FidelityAccumulator()
    for length in (5, 9, 7, 12):
        ref = rng.normal(size=(length, 30))
        acc.add(
            Sequence(tokens=list(range(length)), targets=list(range(1, length))), ref, ref + rng.normal(size=ref.shape)
        )
    r = acc.result()
    per = r["per_sequence"]
    assert per["positions"] == [4, 8, 6, 11] and len(per["kld_sum"]) == len(per["top1"]) == 4
    assert sum(per["kld_sum"]) / sum(per["positions"]) == pytest.approx(r["kl_divergence_mean"])
    assert sum(per["top1"]) / sum(per["positions"]) == pytest.approx(r["top1_agreement"])
    lo, hi = r["kl_divergence_interval"]
    assert lo <= r["kl_divergence_mean"] <= hi
    lo, hi = r["top1_agreement_interval"]
    assert 0 <= lo <= r["top1_agreement"] <= hi <= 1
    assert "bootstrap over sequences" in r["interval_method"]
    assert acc.result() == r  # a fixed seed: the same sums give the same report


def _with_paired(ref_correct, art_correct, **over):
    from edgeft.bench.stats import paired_accuracy

    n = len(ref_correct)
    return _entry(
        fidelity={
            "task_accuracy_reference": sum(ref_correct) / n,
            "task_accuracy_artifact": sum(art_correct) / n,
            "task_accuracy_paired": paired_accuracy(ref_correct, art_correct),
            **over,
        },
        answers=[{"correct": c} for c in art_correct],
    )


def test_the_drop_gate_judges_the_interval_not_the_two_noisy_numbers():
    # 78 questions, the reference right on 52. Noise: 1 lost, 4 gained (the demo's "ratio 1.058").
    ref = [True] * 52 + [False] * 26
    noise = [False] + [True] * 51 + [True] * 4 + [False] * 22
    damaged = [False] * 20 + [True] * 32 + [True] + [False] * 25  # 20 lost, 1 gained
    gates = GatesConfig(max_task_accuracy_drop=0.05, max_flips=3, min_task_accuracy_ratio=0.9)
    by = {g["name"]: g for g in evaluate_gates(_with_paired(ref, noise), gates)}
    assert by["max_task_accuracy_drop"]["passed"] and by["max_flips"]["passed"]
    # the value is the largest drop the interval allows: minus its lower end
    lo = _with_paired(ref, noise)["fidelity"]["task_accuracy_paired"]["interval"][0]
    assert by["max_task_accuracy_drop"]["value"] == -lo
    assert "95% CI" in by["max_task_accuracy_drop"]["detail"] and "1 went right→wrong" in by["max_flips"]["detail"]
    by = {g["name"]: g for g in evaluate_gates(_with_paired(ref, damaged), gates)}
    assert not by["max_task_accuracy_drop"]["passed"] and not by["max_flips"]["passed"]
    assert by["max_flips"]["value"] == 20 and "a real drop" in by["max_task_accuracy_drop"]["detail"]
    # a small, unproven loss: 3 lost of 78 cannot rule out a 9-point drop
    three = [False] * 3 + [True] * 49 + [False] * 26
    by = {g["name"]: g for g in evaluate_gates(_with_paired(ref, three), gates)}
    assert by["max_flips"]["passed"] and not by["max_task_accuracy_drop"]["passed"]
    assert 0.08 < by["max_task_accuracy_drop"]["value"] < 0.1
    # without paired answers (a report made before them) the gate has nothing to judge and fails
    assert not evaluate_gates(_entry(), GatesConfig(max_task_accuracy_drop=0.5))[0]["passed"]


def test_count_gates_parse_as_whole_numbers():
    from edgeft.bench.gates import parse_gate_flags
    from edgeft.errors import ConfigError

    g = parse_gate_flags(("max_flips=2", "max_task_accuracy_drop=0.05"), GatesConfig())
    assert g.max_flips == 2 and isinstance(g.max_flips, int) and g.max_task_accuracy_drop == 0.05
    with pytest.raises(ConfigError, match="max_flips: expected a whole number"):
        parse_gate_flags(("max_flips=2.5",), GatesConfig())
    with pytest.raises(ConfigError, match=r"max_task_accuracy_drop: expected a number <= 1"):
        parse_gate_flags(("max_task_accuracy_drop=1.5",), GatesConfig())


def _report(entry, ids=None, kld=None, positions=None, top1=None, iv=None):
    fid = {}
    if kld is not None:
        fid["per_sequence"] = {"positions": positions, "kld_sum": kld, "top1": top1}
        fid["kl_divergence_mean"] = sum(kld) / sum(positions)
        fid["top1_agreement"] = sum(top1) / sum(positions)
    if iv:
        fid.update(iv)
    entry = {**entry, "fidelity": {**entry["fidelity"], **fid}}
    return {"targets": [entry], "eval": {"question_ids": ids} if ids else {}}


def test_compare_to_pairs_sequences_and_questions_when_both_reports_can():
    from edgeft.bench.gates import regressions

    rng = np.random.default_rng(4)
    positions = [int(x) for x in rng.integers(20, 60, size=40)]
    kld = [float(x) for x in rng.exponential(size=40) * np.asarray(positions) * 0.05]
    top1 = [int(p * 0.8) for p in positions]
    ids = [f"q{i}" for i in range(40)]
    correct = [True] * 30 + [False] * 10
    old = _report(_with_paired(correct, correct), ids, kld, positions, top1)
    # the same figures again, and a noise-sized wobble: nothing to report, nothing to note
    notes: list[str] = []
    assert regressions(old, old, notes=notes) == [] and notes == []
    # every sequence 10% worse, 5 points less top-1: small, but seen on every sequence
    worse = _report(
        _with_paired(correct, correct), ids, [k * 1.1 for k in kld], positions, [int(p * 0.75) for p in positions]
    )
    found = {r["metric"]: r for r in regressions(worse, old)}
    assert set(found) == {"kl_divergence_mean", "top1_agreement"}
    assert "paired bootstrap over the 40 sequences" in found["kl_divergence_mean"]["rule"]
    assert found["kl_divergence_mean"]["interval"][0] > 0 and found["top1_agreement"]["interval"][1] < 0
    # 12 of the 30 questions lost: paired by question id, even in another order
    lost = [False] * 12 + [True] * 18 + [False] * 10
    order = list(reversed(range(40)))
    new = _report(_with_paired(correct, lost), [ids[i] for i in order], kld, positions, top1)
    new["targets"][0]["answers"] = [{"correct": lost[i]} for i in order]
    found = {r["metric"]: r for r in regressions(new, old)}
    assert set(found) == {"task_accuracy_artifact"}
    assert "paired by question" in found["task_accuracy_artifact"]["rule"]
    assert "12 went right→wrong" in found["task_accuracy_artifact"]["rule"]


def test_compare_to_unpaired_reports_use_their_intervals_and_old_reports_the_old_rule():
    from edgeft.bench.gates import NO_INTERVALS, NO_QUESTION_IDS, regressions

    base = _entry()
    old = _report(base, iv={"kl_divergence_interval": [0.18, 0.22], "top1_agreement_interval": [0.78, 0.82]})
    near = _report(
        _entry(fidelity={"kl_divergence_mean": 0.225, "top1_agreement": 0.78}),
        iv={"kl_divergence_interval": [0.205, 0.245], "top1_agreement_interval": [0.76, 0.80]},
    )
    notes: list[str] = []
    # 0.2 → 0.225 is outside the old interval, but not beyond both reports' noise (MOVER)
    assert regressions(near, old, notes=notes) == []
    far = _report(
        _entry(fidelity={"kl_divergence_mean": 0.3, "top1_agreement": 0.7}),
        iv={"kl_divergence_interval": [0.28, 0.32], "top1_agreement_interval": [0.68, 0.72]},
    )
    found = {r["metric"]: r for r in regressions(far, old, notes=notes)}
    assert {"kl_divergence_mean", "top1_agreement"} <= set(found)
    assert "MOVER" in found["kl_divergence_mean"]["rule"]
    assert NO_INTERVALS not in notes and NO_QUESTION_IDS in notes  # _entry's answers carry no question ids
    # an old report without intervals: KLD by the old rule, top-1 not compared, and the notes say so
    notes = []
    found = {r["metric"]: r for r in regressions(far, {"targets": [base]}, notes=notes)}
    assert "kl_divergence_mean" in found and "top1_agreement" not in found
    assert "without intervals" in found["kl_divergence_mean"]["rule"]
    assert NO_INTERVALS in notes and NO_QUESTION_IDS in notes
