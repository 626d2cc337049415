"""Calibration sets: the token sequences an importance matrix is measured on.

Three sets (see ``calibration/SOURCES.md``): ``task`` — the training conversations rendered with the
model's chat template, the text the fine-tune is for; ``general`` — the committed general English
text in ``calibration/general.txt``; ``mix`` — ``task_share`` of the budget from ``task``, the rest
from ``general``. Text is tokenised once, concatenated (documents separated by the end-of-text
token) and cut into fixed-length chunks, as llama.cpp's ``llama-imatrix`` cuts its input file.
Nothing is shuffled: the same inputs give the same chunks, and the set's hash covers the token ids
and the recipe, so it names exactly what the matrix saw.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data import load_jsonl
from .errors import ConfigError
from .files import data_dir, sha256_file

SOURCES = ("task", "general", "mix")


def calibration_dir() -> Path:
    return data_dir("calibration")


def general_text_path() -> Path:
    return calibration_dir() / "general.txt"


@dataclass
class CalibrationSet:
    source: str
    chunks: np.ndarray  # int32 [n_chunks, chunk_tokens]
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(json.dumps(self.recipe, sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.chunks, dtype="<i4").tobytes())
        return h.hexdigest()

    def spread(self, tokens: int) -> CalibrationSet:
        """At most ``tokens`` tokens in whole chunks taken evenly across the set (first and last
        included), for measurements that cost a model run per chunk and want the whole set's variety."""
        n = len(self.chunks)
        k = max(1, min(n, tokens // self.chunks.shape[1]))
        picks = np.unique(np.linspace(0, n - 1, k).round().astype(int))
        recipe = {**self.recipe, "spread": {"of_chunks": n, "picked": picks.tolist()}}
        return CalibrationSet(self.source, self.chunks[picks], recipe)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "chunks": int(self.chunks.shape[0]),
            "chunk_tokens": int(self.chunks.shape[1]),
            "tokens": int(self.chunks.size),
            "recipe": self.recipe,
        }


def _task_ids(tokenizer: Any, train_path: Path) -> list[int]:
    ids: list[int] = []
    for ex in load_jsonl(train_path):
        out = tokenizer.apply_chat_template(ex.messages, tokenize=True, return_dict=False)
        ids += list(out["input_ids"] if hasattr(out, "keys") else out)
    return ids


def _general_ids(tokenizer: Any) -> list[int]:
    path = general_text_path()
    if not path.is_file():
        raise ConfigError(f"{path}: the general calibration text is missing from this installation")
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for paragraph in path.read_text().split("\n\n"):
        ids += tokenizer(paragraph, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    return ids


def build_set(
    source: str,
    tokenizer: Any,
    train_path: Path | None,
    *,
    tokens: int,
    chunk_tokens: int,
    task_share: float,
) -> CalibrationSet:
    """``source``'s calibration set: at most ``tokens`` tokens in chunks of ``chunk_tokens``.

    Too little text for one chunk is an error; less than the budget is used as it is (the recipe
    records the tokens actually taken)."""
    if source not in SOURCES:
        raise ConfigError(f"imatrix: expected one of {', '.join(SOURCES)}, got {source!r}")
    if source != "general" and train_path is None:
        raise ConfigError(f"imatrix = {source!r} needs the training data ([data].train)")
    n_chunks = max(1, tokens // chunk_tokens)
    want = {"task": n_chunks, "general": 0}
    if source == "general":
        want = {"task": 0, "general": n_chunks}
    elif source == "mix":
        want["task"] = max(1, round(n_chunks * task_share))
        want["general"] = n_chunks - want["task"]
    parts = []
    taken = {}
    for name, count in want.items():
        if count == 0:
            taken[name] = 0
            continue
        ids = _task_ids(tokenizer, Path(train_path)) if name == "task" else _general_ids(tokenizer)
        have = len(ids) // chunk_tokens
        if have == 0:
            raise ConfigError(
                f"calibration set {name!r}: {len(ids)} tokens, fewer than one chunk of {chunk_tokens} "
                "([calibration].chunk_tokens)"
            )
        k = min(count, have)
        parts.append(np.asarray(ids[: k * chunk_tokens], dtype=np.int32).reshape(k, chunk_tokens))
        taken[name] = k
    recipe = {
        "source": source,
        "chunk_tokens": chunk_tokens,
        "token_budget": tokens,
        "task_share": task_share if source == "mix" else None,
        "chunks_taken": taken,
        "general_text_sha256": sha256_file(general_text_path()) if taken.get("general") else None,
    }
    return CalibrationSet(source, np.concatenate(parts), recipe)
