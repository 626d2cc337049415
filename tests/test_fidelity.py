import math

import numpy as np

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


def test_gates_pass_and_fail():
    report = {
        "fidelity": {"kl_divergence_mean": 0.2, "top1_agreement": 0.8, "perplexity_delta_pct": 5.0,
                     "task_accuracy_artifact": 0.6, "task_accuracy_reference": 0.8},
        "latency": {"decode_tok_s": 50.0},
        "artifact": {"size_bytes": 100e6},
    }
    gates = evaluate_gates(report, GatesConfig(max_kld=0.1, min_top1=0.5, min_task_accuracy_ratio=0.7, max_size_mb=150))
    by = {g["name"]: g["passed"] for g in gates}
    assert by == {"max_kld": False, "min_top1": True, "min_task_accuracy_ratio": True, "max_size_mb": True}
    assert evaluate_gates(report, GatesConfig()) == []
