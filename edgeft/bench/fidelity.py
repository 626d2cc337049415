"""How far an artifact's predictions moved from the reference's, on the same token ids.

Both runtimes score the *same* token sequences (tokenised once, by the reference), so tokenizer
differences cannot hide in these numbers; tokenizer agreement is tested separately. Scored positions
are the assistant replies of the held-out conversations (the domain text the fine-tune is about),
each position predicting the next reply token.

* mean KL divergence KL(reference ‖ artifact) of the next-token distributions,
* top-1 agreement: both runtimes' most likely next token are the same,
* perplexity of each on the reply tokens, with a ± standard error.

KLD and top-1 carry 95% intervals from a bootstrap over *sequences* (see :mod:`.stats`), and the
per-sequence sums they are computed from (``per_sequence``), so a later report can pair its
figures with these sequence by sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data import IGNORE_INDEX, Example, is_correct, tokenize_example
from ..divergence import kl_divergence, log_softmax, topk_kl_divergence
from .stats import BOOTSTRAP_METHOD, bootstrap_ratio


@dataclass
class Sequence:
    tokens: list[int]
    targets: list[int]  # positions whose token is predicted (each needs position - 1 >= 0)


@dataclass
class FidelityAccumulator:
    """Streams per-sequence statistics so no more than one sequence's logits are held at a time."""

    kld: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    nll_ref: list[float] = field(default_factory=list)
    nll_art: list[float] = field(default_factory=list)
    # per sequence: scored positions, Σ KLD, top-1 agreements (what the intervals resample)
    seq_positions: list[int] = field(default_factory=list)
    seq_kld: list[float] = field(default_factory=list)
    seq_top1: list[int] = field(default_factory=list)

    def _add_sequence(self, kld: np.ndarray, agree: np.ndarray) -> None:
        self.kld += kld.tolist()
        self.top1 += agree.tolist()
        self.seq_positions.append(len(kld))
        self.seq_kld.append(float(kld.sum()))
        self.seq_top1.append(int(agree.sum()))

    def add(self, seq: Sequence, ref_logits: np.ndarray, art_logits: np.ndarray) -> None:
        pos = np.asarray(seq.targets) - 1
        tgt = np.asarray(seq.tokens)[seq.targets]
        lr = log_softmax(ref_logits[pos])
        la = log_softmax(art_logits[pos])
        self._add_sequence(kl_divergence(lr, la), lr.argmax(-1) == la.argmax(-1))
        rows = np.arange(len(pos))
        self.nll_ref += (-lr[rows, tgt]).tolist()
        self.nll_art += (-la[rows, tgt]).tolist()

    def add_topk(
        self,
        seq: Sequence,
        topk_ids: np.ndarray,
        topk_logp: np.ndarray,
        target_logp: np.ndarray,
        art_logits: np.ndarray,
    ) -> None:
        """Like :meth:`add`, with the reference given as stored top-k log-probs (k tokens + a tail bin)."""
        pos = np.asarray(seq.targets) - 1
        tgt = np.asarray(seq.tokens)[seq.targets]
        la = log_softmax(art_logits[pos])
        qk = np.take_along_axis(la, topk_ids.astype(np.int64), axis=-1)
        self._add_sequence(topk_kl_divergence(topk_logp, qk), topk_ids[:, 0] == la.argmax(-1))
        self.nll_ref += (-target_logp.astype(np.float64)).tolist()
        self.nll_art += (-la[np.arange(len(pos)), tgt]).tolist()

    def result(self) -> dict[str, Any]:
        ppl_ref, err_ref = perplexity(self.nll_ref)
        ppl_art, err_art = perplexity(self.nll_art)
        kld = np.asarray(self.kld)
        kld_iv = bootstrap_ratio(self.seq_kld, self.seq_positions)
        top1_iv = bootstrap_ratio(self.seq_top1, self.seq_positions)
        return {
            "positions": len(kld),
            "kl_divergence_mean": float(kld.mean()),
            "kl_divergence_se": float(kld.std(ddof=1) / math.sqrt(len(kld))) if len(kld) > 1 else 0.0,
            "kl_divergence_p99": float(np.percentile(kld, 99)),
            "top1_agreement": float(np.mean(self.top1)),
            "perplexity_reference": ppl_ref,
            "perplexity_reference_err": err_ref,
            "perplexity_artifact": ppl_art,
            "perplexity_artifact_err": err_art,
            "perplexity_delta_pct": 100.0 * (ppl_art / ppl_ref - 1.0),
            "kl_divergence_interval": list(kld_iv) if kld_iv else None,
            "top1_agreement_interval": list(top1_iv) if top1_iv else None,
            "interval_method": BOOTSTRAP_METHOD,
            "per_sequence": {"positions": self.seq_positions, "kld_sum": self.seq_kld, "top1": self.seq_top1},
        }


def perplexity(nll: list[float]) -> tuple[float, float]:
    """exp(mean NLL) and its standard error by the delta method (as llama.cpp's perplexity tool)."""
    a = np.asarray(nll)
    ppl = math.exp(a.mean())
    err = ppl * a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else float("nan")
    return ppl, err


def compare(reference, artifact, sequences: list[Sequence], progress=None) -> dict[str, Any]:
    """Fidelity of ``artifact`` against ``reference`` (both :class:`Runtime`) on ``sequences``."""
    acc = FidelityAccumulator()
    for seq in sequences:
        acc.add(seq, reference.logits(seq.tokens), artifact.logits(seq.tokens))
        if progress:
            progress()
    return acc.result()


def compare_stored(stored, artifact, progress=None) -> dict[str, Any]:
    """Fidelity of ``artifact`` against a :class:`~edgeft.bench.reference.StoredReference`."""
    acc = FidelityAccumulator()
    for seq, ids, logp, tlp in zip(stored.sequences(), stored.topk_ids, stored.topk_logp, stored.target_logp):
        acc.add_topk(seq, ids, logp, tlp, artifact.logits(seq.tokens))
        if progress:
            progress()
    return acc.result()


def reply_sequences(tokenizer, examples: list[Example], max_len: int = 1024) -> list[Sequence]:
    """Token ids of each held-out conversation and the positions of its assistant reply tokens."""
    seqs = []
    for ex in examples:
        row = tokenize_example(tokenizer, ex, max_len)
        targets = [i for i, lbl in enumerate(row["labels"]) if lbl != IGNORE_INDEX and i > 0]
        if targets:
            seqs.append(Sequence(row["input_ids"], targets))
    return seqs


def task_accuracy(replies: list[str], examples: list[Example]) -> float:
    return sum(is_correct(r, ex.answers) for r, ex in zip(replies, examples)) / len(examples)
