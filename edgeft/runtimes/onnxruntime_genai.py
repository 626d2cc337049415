"""onnxruntime-genai runtime: load an ONNX model folder as an app does, tokenize, score, generate.

Generation uses only what the folder carries: its tokenizer, its chat template and the end-of-turn
ids in ``genai_config.json``, so a template or stop-token problem in an export shows up here as it
would in an Android or iOS app. Scoring feeds the reference's token ids straight to the model and
reads the logits of every position (``get_output("logits")`` after one ``append_tokens``).

``onnxruntime_genai`` is imported when a runtime is created, not when this module is imported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from ..formats.onnx.inspect import check_artifact, genai_config
from ..loading import loading
from ..machine import usable_cores
from .base import Generation


class OnnxGenaiRuntime:
    name = "onnxruntime-genai"

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        import onnxruntime_genai as og

        folder = Path(folder)
        check_artifact(folder)
        self.folder = folder
        config = genai_config(folder)
        eos = config["model"].get("eos_token_id", [])
        self._eos = set(eos if isinstance(eos, list) else [eos])
        self.n_ctx = int(config["model"].get("context_length") or 2048)
        self._og = og
        with loading(folder, "the ONNX model with onnxruntime-genai"):
            og_config = og.Config(str(folder))
            if threads:  # the folder ships ORT's default (all cores); benchmarks pin the count
                options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
                og_config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            self._model = og.Model(og_config)
            self.tokenizer = og.Tokenizer(self._model)
        self.threads = int(threads) if threads else _physical_cores()
        self.version = og.__version__
        self.build_info = f"onnxruntime-genai {og.__version__}, CPU execution provider, {self.threads} threads"

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids as the app's tokenizer gives them (special tokens parsed, no BOS added)."""
        return [int(t) for t in self.tokenizer.encode(text)]

    def logits(self, tokens: list[int]) -> np.ndarray:
        """float32 ``[len(tokens), vocab]``: row i is the next-token logits after ``tokens[: i + 1]``."""
        if not tokens or len(tokens) >= self.n_ctx:
            raise ValueError(f"need 1 to {self.n_ctx - 1} tokens, got {len(tokens)}")
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(do_sample=False, max_length=len(tokens) + 1)
        gen = self._og.Generator(self._model, params)
        gen.append_tokens(np.asarray(tokens, dtype=np.int32))
        out = np.asarray(gen.get_output("logits"), dtype=np.float32)
        del gen
        return out.reshape(-1, out.shape[-1])[-len(tokens) :]

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt from the folder's own chat template, ready for the reply."""
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int, ignore_eos: bool = False) -> Generation:
        """Greedy reply, stopping at an end-of-generation id (unless ``ignore_eos``)."""
        prompt = self.tokenize(self.render_chat(messages))
        params = self._og.GeneratorParams(self._model)
        total = len(prompt) + max_new_tokens
        search: dict[str, Any] = {"do_sample": False, "max_length": total}
        if ignore_eos:
            search["min_length"] = total  # suppresses the end-of-turn id, as llama.cpp's ignore_eos does
        params.set_search_options(**search)
        gen = self._og.Generator(self._model, params)
        out: list[int] = []
        stopped = False
        start = time.perf_counter()
        first = None
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))  # prefill
        while not gen.is_done() and len(out) < max_new_tokens:
            gen.generate_next_token()
            token = int(gen.get_next_tokens()[0])
            if first is None:
                first = time.perf_counter()
            if token in self._eos and not ignore_eos:
                stopped = True
                break
            out.append(token)
        total_s = time.perf_counter() - start
        del gen
        text = self.tokenizer.decode(np.asarray(out, dtype=np.int32)) if out else ""
        return Generation(text, len(prompt), len(out), stopped, (first or start) - start, total_s)

    def close(self) -> None:
        self.tokenizer = None
        self._model = None


def _physical_cores() -> int:
    """Physical cores, at most the cores this process may run on (a CPU set, a pinned process)."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or usable_cores()
    except ImportError:
        physical = usable_cores()
    return min(physical, usable_cores())


def load(model: Path, threads: int, scoring: bool) -> OnnxGenaiRuntime:
    del scoring  # the builder's graphs always return every position's logits
    if not Path(model).is_dir():
        raise ModelError(f"{model}: expected an ONNX model folder")
    return OnnxGenaiRuntime(model, threads=threads)
