"""llama.cpp runtime (through llama-cpp-python): load a GGUF file, tokenize, score, generate.

Generation uses only what the GGUF itself carries: its chat template (rendered with Jinja2, as
llama.cpp's server does) and its end-of-generation tokens, so a template or stop-token bug in an
export shows up here exactly as it would in an app.

``llama_cpp`` is imported when a runtime is created, not when this module is imported, so code
that only lists runtimes or reads reports does not need the compiled extension.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import BENCH_CONTEXT
from ..errors import ConfigError, ModelError
from ..loading import loading
from ..machine import usable_cores
from .base import Generation

# KV-cache element type, by the name llama.cpp's CLI uses (--cache-type-k/-v) → llama_cpp constant.
KV_CACHE_TYPES = {"f16": "GGML_TYPE_F16", "f32": "GGML_TYPE_F32"}


class LlamaCppRuntime:
    """A GGUF model loaded in llama.cpp, scoring whole sequences (logits at every position)."""

    name = "llama.cpp"

    def __init__(
        self,
        gguf_path: Path,
        n_threads: int | None = None,
        n_ctx: int = BENCH_CONTEXT,
        kv_cache_type: str = "f16",
        scoring: bool = True,
    ) -> None:
        """``kv_cache_type`` "f16" is llama.cpp's default and what a deployment runs; "f32" removes
        the cache's rounding (logits move by up to ~0.1 on SmolLM2) when checking an export.
        ``scoring=False`` keeps only the last position's logits, as an app does: use it when
        timing generation, since computing every prompt position's logits inflates prefill time."""
        import llama_cpp

        gguf_path = Path(gguf_path)
        if not gguf_path.is_file():
            raise ModelError(f"{gguf_path}: no such GGUF file")
        if kv_cache_type not in KV_CACHE_TYPES:
            raise ConfigError(f"kv_cache_type {kv_cache_type!r}: expected one of {', '.join(KV_CACHE_TYPES)}")
        ggml_type = getattr(llama_cpp, KV_CACHE_TYPES[kv_cache_type])
        # No count given: the cores this process may use. llama-cpp-python's own defaults are half
        # the machine's CPUs for decode and all of them for the batch, whatever the CPU set allows.
        n_threads = n_threads or usable_cores()
        self.version: str = llama_cpp.__version__
        # Which instruction sets this llama.cpp was compiled for ("AVX512 = 1 | ..."): reports
        # carry it, since the same GGUF decodes 0-50% faster with an AVX-512 build.
        self.build_info: str = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        self.gguf_path = gguf_path
        self.n_ctx = n_ctx
        # logits_all: llama.cpp keeps the logits of every position, which scoring needs; by
        # default it keeps only the last one (enough for sampling). n_threads_batch (prompt and
        # scoring) is set to the decode count, so one number describes the run.
        # llama-cpp-python raises a bare ValueError("Failed to load model from file") on a file
        # llama.cpp cannot read; say which file, and that it is the file's fault.
        with loading(
            gguf_path, "GGUF (llama.cpp could not read it: truncated, not GGUF, or an unsupported architecture)"
        ):
            self._llm: Any = llama_cpp.Llama(
                model_path=str(gguf_path),
                n_ctx=n_ctx,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                logits_all=scoring,
                type_k=ggml_type,
                type_v=ggml_type,
                verbose=False,
            )
        self.n_threads: int = self._llm.n_threads  # the effective count, for reports
        self.threads = self.n_threads
        self._llama_cpp = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text`` without a BOS; ``special`` parses ``<|im_start|>`` etc. as tokens."""
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """float32 ``[len(tokens), vocab]``: row i is the next-token logits after ``tokens[: i + 1]``."""
        if not tokens or len(tokens) > self.n_ctx:
            raise ValueError(f"need 1 to n_ctx={self.n_ctx} tokens, got {len(tokens)}")
        # reset() rewinds the position to 0 and eval() then drops KV-cache entries from there, so
        # every call scores its sequence from scratch.
        self._llm.reset()
        self._llm.eval(tokens)
        return np.array(self._llm.scores[: len(tokens)], dtype=np.float32)

    def _token_text(self, token: int) -> str:
        return self._llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8")

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for ``messages`` from the GGUF's own chat template, ready for the reply."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelError(f"{self.gguf_path}: the GGUF has no tokenizer.chat_template")
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(self._llm.token_eos()),
            bos_token=self._token_text(self._llm.token_bos()),
            add_generation_prompt=True,
        )
        return formatter(messages=messages).prompt

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int, ignore_eos: bool = False) -> Generation:
        """Greedy reply to a chat, stopping at an end-of-generation token (unless ``ignore_eos``)."""
        prompt = self.tokenize(self.render_chat(messages))
        out: list[int] = []
        stopped = False
        start = time.perf_counter()
        first = None
        # temp=0 makes llama-cpp-python's sampler greedy; the generator yields each sampled token
        # after evaluating the previous one, so the first yield marks the end of prompt processing.
        for token in self._llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            if not ignore_eos and self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
                stopped = True
                break
            out.append(token)
            if len(out) >= max_new_tokens:
                break
        total = time.perf_counter() - start
        text = self._llm.detokenize(out).decode("utf-8", errors="replace")
        return Generation(text, len(prompt), len(out), stopped, (first or start) - start, total)

    def close(self) -> None:
        """Free the model and context now rather than at garbage collection."""
        self._llm.close()


def load(model: Path, threads: int, scoring: bool) -> LlamaCppRuntime:
    return LlamaCppRuntime(model, n_threads=threads, scoring=scoring)
