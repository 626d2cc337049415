"""Chat JSONL datasets: loading with line-precise errors, answer checking, and an example tokenised
with the model's chat template (what training learns from and the bench scores).

One example per line::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "answers": ["165"]}

``messages`` follows the Hugging Face chat format and must end with an assistant turn. ``answers``
is optional for training data and required for task accuracy: a reply is correct when it contains
any accepted string (see :func:`is_correct`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .loading import parse_json

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label value the loss skips (transformers convention)


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, str]]
    answers: list[str] = field(default_factory=list)

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the final assistant reply."""
        return self.messages[:-1]

    @property
    def reply(self) -> str:
        return self.messages[-1]["content"]


def _check_line(obj: object, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with a 'messages' list")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty 'messages' list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}]: expected {{'role': one of {'/'.join(ROLES)}, 'content': string}}")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must have role 'assistant' (the reply to learn)")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: expected at least one 'user' message")
    answers = obj.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers):
        raise DataError(f"{where}: 'answers' must be a list of non-empty strings")
    unknown = set(obj) - {"messages", "answers"}
    if unknown:
        raise DataError(f"{where}: unknown key {sorted(unknown)[0]!r}; expected 'messages' and optional 'answers'")
    return Example(messages=messages, answers=answers)


def load_jsonl(path: Path, *, need_answers: bool = False) -> list[Example]:
    """Read and validate a chat JSONL file; errors name the file and line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: dataset file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read dataset ({e})") from None
    examples = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = parse_json(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        ex = _check_line(obj, where)
        if need_answers and not ex.answers:
            raise DataError(f"{where}: held-out examples need an 'answers' list for task accuracy")
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: dataset is empty")
    return examples


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def is_correct(reply: str, answers: list[str]) -> bool:
    """True when ``reply`` contains one of ``answers``.

    Case and whitespace are ignored. An accepted string that starts or ends with a digit must not
    touch another digit in the reply, so ``165`` does not match ``1650`` or ``2165``.
    """
    text = _normalise(reply)
    for answer in answers:
        a = _normalise(answer)
        left = r"(?<!\d)" if a[:1].isdigit() else ""
        right = r"(?!\d)" if a[-1:].isdigit() else ""
        if re.search(left + re.escape(a) + right, text):
            return True
    return False


def tokenize_example(tokenizer: Any, ex: Example, max_len: int) -> dict[str, list[int]]:
    """Token ids of the whole conversation and labels that keep only the assistant replies.

    Each assistant turn's tokens are found by rendering the conversation up to that turn with and
    without it: the chat template renders prefixes identically, so the difference is exactly the
    reply (its end-of-turn token included, which is what teaches the model to stop).
    """
    ids = tokenizer.apply_chat_template(ex.messages, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(ex.messages):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tokenizer.apply_chat_template(ex.messages[:i], add_generation_prompt=True, tokenize=True)))
        end = len(_ids(tokenizer.apply_chat_template(ex.messages[: i + 1], tokenize=True)))
        labels[start:end] = ids[start:end]
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)
