"""The interface every runtime offers, so fidelity and latency code is written once.

A runtime loads one artifact (an HF folder for torch, a .gguf for llama.cpp) and can:

* ``tokenize(text)`` — token ids, special tokens parsed, no BOS added;
* ``logits(tokens)`` — next-token logits at every position, float32 ``[len(tokens), vocab]``;
* ``generate(messages, max_new_tokens)`` — greedy decoding of a chat with the model's own chat
  template and stop tokens, timed (``ignore_eos`` forces the full budget, for latency runs).

No heavy imports here: this module is used on devices without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class Generation:
    text: str
    n_prompt: int  # prompt tokens
    n_tokens: int  # generated tokens, stop token excluded
    stopped: bool  # ended on an end-of-generation token, not on the token budget
    ttft_s: float  # prompt processing up to the first generated token
    total_s: float

    @property
    def decode_tok_s(self) -> float:
        """Tokens/s after the first one: the steady-state decode speed."""
        decode_s = self.total_s - self.ttft_s
        return (self.n_tokens - 1) / decode_s if self.n_tokens > 1 and decode_s > 0 else float("nan")


class Runtime(Protocol):
    name: str
    version: str
    build_info: str  # what the backend was compiled for / dispatches to on this CPU, for reports
    threads: int

    def tokenize(self, text: str, special: bool = True) -> list[int]: ...

    def logits(self, tokens: list[int]) -> np.ndarray: ...

    def render_chat(self, messages: list[dict[str, str]]) -> str: ...

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int, ignore_eos: bool = False) -> Generation: ...

    def close(self) -> None: ...
