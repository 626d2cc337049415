"""KL divergence of an artifact's next-token distribution from the reference's, one definition for
every caller: the bench's fidelity rows, the GGUF sensitivity sweep and the ONNX one.

Both forms sum in float64 and clip each position at 0: a divergence is never negative, and a slightly
negative sum is rounding in the log-probabilities, not information. The full-vocabulary form keeps its
inputs' dtype for the element-wise terms (a float32 [positions, vocab] pair is not copied to float64).
"""

from __future__ import annotations

import numpy as np

TAIL_FLOOR = 1e-12  # the least probability a top-k tail bin is given (it is 0 when k covers the vocab)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logp: np.ndarray, art_logp: np.ndarray) -> np.ndarray:
    """Per position KL(reference ‖ artifact) from both full log-probability rows [..., vocab]."""
    return (np.exp(ref_logp) * (ref_logp - art_logp)).sum(-1, dtype=np.float64).clip(min=0)


def topk_kl_divergence(ref_topk_logp: np.ndarray, art_logp_at_topk: np.ndarray) -> np.ndarray:
    """Per position KL(reference ‖ artifact) over the reference's k most likely tokens and one bin for
    the rest of the vocabulary: both rows [..., k] are log-probabilities of the same k tokens."""
    lp = np.asarray(ref_topk_logp, dtype=np.float64)
    lq = np.asarray(art_logp_at_topk, dtype=np.float64)
    p = np.exp(lp)
    p_rest = np.clip(1.0 - p.sum(-1), TAIL_FLOOR, 1.0)
    q_rest = np.clip(1.0 - np.exp(lq).sum(-1), TAIL_FLOOR, 1.0)
    return ((p * (lp - lq)).sum(-1) + p_rest * (np.log(p_rest) - np.log(q_rest))).clip(min=0)
