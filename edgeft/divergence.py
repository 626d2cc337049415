"""KL divergence of an artifact's next-token distribution from the reference's, one definition for
every caller: the bench's fidelity rows, the GGUF sensitivity sweep and the ONNX one.

Both forms sum in float64 and clip each position at 0: a divergence is never negative, and a slightly
negative sum is rounding in the log-probabilities, not information. The full-vocabulary form keeps its
inputs' dtype for the element-wise terms (a float32 [positions, vocab] pair is not copied to float64).

:class:`TopKReference` keeps a sweep's reference as its top-k log-probs per position (both sweeps
score many probes against one reference; the full fp32 rows would be positions × vocab × 4 bytes).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

TAIL_FLOOR = 1e-12  # the least probability a top-k tail bin is given (it is 0 when k covers the vocab)
TOP_K = 256  # reference log-probs a sweep keeps per position (k tokens + a tail bin)
_ROWS = 64  # positions per block when reducing over the vocabulary (bounds temporaries)


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


def _logsumexp_rows(z: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """float64 log-sum-exp of each row of ``z`` (float32), ``buf`` a scratch block as wide."""
    m = z.max(axis=1, keepdims=True)
    b = buf[: len(z)]
    np.subtract(z, m, out=b)
    np.exp(b, out=b)
    return m[:, 0].astype(np.float64) + np.log(b.sum(axis=1, dtype=np.float64))


def _blocks(n: int) -> Callable[[], Any]:
    return (slice(i, min(n, i + _ROWS)) for i in range(0, n, _ROWS))  # type: ignore[return-value]


class TopKReference:
    """The reference's top-k next-token log-probs at every position of a set of chunks."""

    def __init__(self, k: int = TOP_K) -> None:
        self.k = k
        self.ids: list[np.ndarray] = []  # per chunk [n, k] int32
        self.logp: list[np.ndarray] = []  # per chunk [n, k] float32 (as stored), descending

    @classmethod
    def from_arrays(cls, ids: np.ndarray, logp: np.ndarray) -> TopKReference:
        """A reference stored by :meth:`to_arrays` ([chunks, n, k] ids and log-probs)."""
        ref = cls(int(ids.shape[-1]))
        ref.ids, ref.logp = list(ids.astype(np.int32)), list(logp.astype(np.float32))
        return ref

    def add(self, logits: np.ndarray) -> None:
        n, vocab = logits.shape
        k = min(self.k, vocab)
        buf = np.empty((min(n, _ROWS), vocab), dtype=np.float32)
        ids = np.empty((n, k), dtype=np.int32)
        logp = np.empty((n, k), dtype=np.float32)
        for rows in _blocks(n):
            z = logits[rows]
            lse = _logsumexp_rows(z, buf)
            idx = np.argpartition(-z, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(z, idx, axis=1).astype(np.float64) - lse[:, None]
            order = np.argsort(-vals, axis=1, kind="stable")
            ids[rows] = np.take_along_axis(idx, order, axis=1)
            logp[rows] = np.take_along_axis(vals, order, axis=1)
        self.ids.append(ids)
        self.logp.append(logp)

    def kld(self, chunk: int, logits: np.ndarray) -> np.ndarray:
        """Per position KL(reference ‖ probe) over the k tokens and one bin for the rest (float64)."""
        n, vocab = logits.shape
        buf = np.empty((min(n, _ROWS), vocab), dtype=np.float32)
        out = np.empty(n)
        ids, lp = self.ids[chunk], self.logp[chunk]
        for rows in _blocks(n):
            lse = _logsumexp_rows(logits[rows], buf)
            lq = np.take_along_axis(logits[rows], ids[rows], axis=1).astype(np.float64) - lse[:, None]
            out[rows] = topk_kl_divergence(lp[rows], lq)
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"topk_ids": np.stack(self.ids), "topk_logp": np.stack(self.logp)}
