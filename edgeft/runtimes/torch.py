"""The full-precision reference runtime: transformers on torch, CPU (or CUDA when present).

fp32 by default; ``dtype="bfloat16"`` loads the (fp32) folder in bf16, half the memory, for a model
whose fp32 copy does not fit (see :func:`edgeft.resources.reference_dtype`). Logits leave it as fp32
either way, so log-softmax and top-k are computed at full precision."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DTYPE_SHORT
from ..errors import ConfigError
from ..loading import loading
from .base import Generation


class _Clock:
    """A generate() streamer that records when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        # The first put() is the prompt itself; the second is the first generated token.
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class TorchRuntime:
    name = "torch"

    def __init__(self, model_dir: Path, threads: int = 0, model: Any = None, dtype: str = "float32"):
        """``model``: an already loaded model to run where it was placed (an adapter on a 4-bit base);
        ``model_dir`` then supplies the tokenizer only. ``dtype``: what the weights are loaded in,
        ``float32`` or ``bfloat16`` (:data:`edgeft.config.DTYPE_SHORT`)."""
        import torch

        if dtype not in DTYPE_SHORT:
            raise ConfigError(f"torch dtype {dtype!r}: expected one of {', '.join(DTYPE_SHORT)}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads > 0:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.version = f"torch {torch.__version__}"
        # The kernels torch dispatches to on this CPU (e.g. AVX512): why fp32 speed differs ~2x by machine.
        self.build_info = f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {self.threads} threads"

        with loading(model_dir, "the model with transformers"):
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
                model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval()
        self.device = next(self.model.parameters()).device
        self._torch = torch
        self._eos = list({self.tokenizer.eos_token_id, *self._generation_eos()} - {None})

    def _generation_eos(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        return eos if isinstance(eos, list) else [eos]

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"]

    def logits(self, tokens: list[int]) -> np.ndarray:
        with self._torch.inference_mode():
            ids = self._torch.tensor([tokens], device=self.device)
            return self.model(input_ids=ids).logits[0].float().cpu().numpy()

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int, ignore_eos: bool = False) -> Generation:
        prompt = self.tokenize(self.render_chat(messages))
        ids = self._torch.tensor([prompt], device=self.device)
        clock = _Clock()
        start = time.perf_counter()
        with self._torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=self._torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if ignore_eos else None,
                do_sample=False,
                eos_token_id=self._eos,
                pad_token_id=self.tokenizer.pad_token_id or self._eos[0],
                streamer=clock,
            )
        total = time.perf_counter() - start
        new = out[0, len(prompt) :].tolist()
        stopped = bool(new) and new[-1] in self._eos
        if stopped:
            new = new[:-1]
        ttft = (clock.first or time.perf_counter()) - start
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Generation(text, len(prompt), len(new), stopped, ttft, total)

    def generate_batch(
        self, conversations: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int = 16
    ) -> list[str]:
        """Greedy answers for many chats at once (left-padded batches): for task accuracy, not timing."""
        tok = self.tokenizer
        tok.padding_side = "left"
        pad = tok.pad_token_id if tok.pad_token_id is not None else self._eos[0]
        replies: list[str] = []
        for i in range(0, len(conversations), batch_size):
            prompts = [self.render_chat(c) for c in conversations[i : i + batch_size]]
            enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(self.device)
            with self._torch.inference_mode():
                out = self.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self._eos, pad_token_id=pad
                )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                cut = next((j for j, t in enumerate(row) if t in self._eos), len(row))
                replies.append(tok.decode(row[:cut], skip_special_tokens=True))
        return replies

    def close(self) -> None:
        del self.model


def load(model: Path, threads: int, scoring: bool, dtype: str = "float32") -> TorchRuntime:
    del scoring  # torch always returns every position's logits
    return TorchRuntime(model, threads=threads, dtype=dtype)
