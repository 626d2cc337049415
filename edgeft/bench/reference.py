"""The fine-tuned reference, stored compactly so artifacts can be measured without torch.

For every scored position (the assistant reply tokens of the held-out set) we keep the reference's
top-k token ids and log-probabilities, the log-probability of the true next token (exact, for
perplexity), and implicitly the probability mass outside the top k (1 − Σ top-k). KL divergence is
then computed over k + 1 bins — the k tokens and "everything else" — as llama.cpp's KLD tool does
with full logits but at a fraction of the size (k = 64: ~0.5 KB per position instead of 196 KB
for SmolLM2's 49,152-word vocabulary, and the same for an 8B model).

Merging the tail into one bin can only lower KL (log-sum inequality), so the top-k figure is a
lower bound on the exact one; tests measure the gap on SmolLM2.

Files in a reference folder: ``reference.npz`` (arrays) and ``reference.json`` (held-out examples,
reference replies and figures, latency/memory of the torch reference). Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Example
from ..divergence import log_softmax
from ..errors import ModelError
from ..loading import loading, read_json
from .fidelity import Sequence

ARRAYS = "reference.npz"
META = "reference.json"


@dataclass
class StoredReference:
    tokens: list[np.ndarray]  # per sequence: token ids (int32)
    targets: list[np.ndarray]  # per sequence: positions whose token is predicted
    topk_ids: list[np.ndarray]  # per sequence: [n_targets, k] int32
    topk_logp: list[np.ndarray]  # per sequence: [n_targets, k] float32, sorted descending
    target_logp: list[np.ndarray]  # per sequence: [n_targets] float32, log p(true next token)
    meta: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def examples(self) -> list[Example]:
        return [Example(e["messages"], e["answers"]) for e in self.meta["examples"]]

    def sequences(self) -> list[Sequence]:
        return [Sequence(t.tolist(), g.tolist()) for t, g in zip(self.tokens, self.targets)]


def topk_of(logits: np.ndarray, positions: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids and log-probs (descending) of the next-token distributions at ``positions``."""
    lp = log_softmax(logits[positions])
    idx = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(lp, idx, axis=-1)
    order = np.argsort(-vals, axis=-1)
    return np.take_along_axis(idx, order, -1).astype(np.int32), np.take_along_axis(vals, order, -1).astype(np.float32)


def record(runtime, sequences: list[Sequence], k: int, progress=None) -> dict[str, list[np.ndarray]]:
    """Score ``sequences`` with ``runtime`` and keep what :class:`StoredReference` needs."""
    out: dict[str, list[np.ndarray]] = {"tokens": [], "targets": [], "topk_ids": [], "topk_logp": [], "target_logp": []}
    for seq in sequences:
        logits = runtime.logits(seq.tokens)
        pos = [t - 1 for t in seq.targets]
        ids, logp = topk_of(logits, pos, k)
        full = log_softmax(logits[pos])
        out["tokens"].append(np.asarray(seq.tokens, dtype=np.int32))
        out["targets"].append(np.asarray(seq.targets, dtype=np.int32))
        out["topk_ids"].append(ids)
        out["topk_logp"].append(logp)
        out["target_logp"].append(full[np.arange(len(pos)), np.asarray(seq.tokens)[seq.targets]].astype(np.float32))
        if progress:
            progress()
    return out


def save(folder: Path, arrays: dict[str, list[np.ndarray]], meta: dict[str, Any]) -> None:
    flat: dict[str, np.ndarray] = {}
    for name, per_seq in arrays.items():
        flat[name] = np.concatenate(per_seq)
        flat[f"{name}_lengths"] = np.asarray([len(a) for a in per_seq], dtype=np.int64)
    np.savez_compressed(Path(folder) / ARRAYS, **flat)
    (Path(folder) / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False))


_ARRAY_NAMES = ("tokens", "targets", "topk_ids", "topk_logp", "target_logp")
_META_KEYS = ("top_k", "examples")  # what reading the arrays back needs; a build's reference has more


def load(folder: Path) -> StoredReference:
    """Read a stored reference; a missing, truncated or foreign file is a ModelError naming it."""
    folder = Path(folder)
    if not (folder / ARRAYS).is_file() or not (folder / META).is_file():
        raise ModelError(
            f"{folder}: not a stored reference (expected {ARRAYS} and {META}); create one with `edgeft build` or `edgeft bench --reference HF_FOLDER`"
        )
    with loading(folder / META, "the stored reference"):
        meta = read_json(folder / META)
    if not isinstance(meta, dict) or any(k not in meta for k in _META_KEYS):
        missing = next((k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta), "?")
        raise ModelError(f"{folder / META}: not a stored reference ({missing!r} missing)")
    parts = {}
    with loading(folder / ARRAYS, "the stored reference arrays"):
        with np.load(folder / ARRAYS) as data:
            for name in _ARRAY_NAMES:
                cuts = np.cumsum(data[f"{name}_lengths"])[:-1]
                parts[name] = np.split(data[name], cuts)
    return StoredReference(meta=meta, **parts)


def is_stored_reference(folder: Path) -> bool:
    return (Path(folder) / ARRAYS).is_file() and (Path(folder) / META).is_file()
