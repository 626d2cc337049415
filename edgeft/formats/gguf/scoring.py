"""Scoring calibration chunks in llama.cpp for the sensitivity sweep, without copying logits.

* :class:`Scorer`: a GGUF file loaded through llama.cpp's C API (memory-mapped), which decodes one
  fixed-length chunk at a time and hands back a read-only numpy *view* of llama.cpp's own logits
  buffer (``llama-cpp-python``'s ``Llama`` copies every position's logits into ``scores`` and
  ``LlamaCppRuntime.logits`` copies them again: 200 MB a 512-token chunk for a 100k vocabulary).
  With ``observe``, llama.cpp's eval callback (the hook ``llama-imatrix`` uses) passes the input
  of every matrix multiplication by a model weight to :class:`ActivationStats`.
* :class:`~edgeft.divergence.TopKReference` (shared with the ONNX sweep, kept in :mod:`edgeft.divergence`):
  the F32 model's top-k log-probabilities per position plus the mass of everything else, as
  :mod:`edgeft.bench.reference` stores a build's reference; :meth:`~TopKReference.kld` is then one
  log-sum-exp over a probe's logits and a gather, not a full-vocabulary KL divergence.
  Merging the tail into one bin can only lower KL (log-sum inequality): the figure is a lower bound
  on the full one, by about the same share for every probe (measured on SmolLM2-135M over two
  2 × 512-token chunks of the cooking data: 96% of the full figure at k = 256, 94% at 128, both for a
  file all Q8_0 and one all Q4_K), so probes rank as with the full figure (a test checks both).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ...divergence import TopKReference
from ...errors import ModelError
from ...machine import usable_cores


class _GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of the ggml llama-cpp-python was built with (its ``include/ggml.h``);
    :func:`_ggml` checks the size against the library's own before anything reads one."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type + 4 bytes of padding
GGML_TYPE_F32 = 0


def _ggml() -> Any:
    """libggml with the few functions used here typed; refuses a ggml whose tensor struct differs."""
    from llama_cpp._ggml import libggml

    if getattr(libggml, "_edgeft_typed", False):
        return libggml
    libggml.ggml_tensor_overhead.restype = ctypes.c_size_t
    libggml.ggml_op_name.restype = ctypes.c_char_p
    libggml.ggml_op_name.argtypes = [ctypes.c_int]
    libggml.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    libggml.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    libggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    size = libggml.ggml_tensor_overhead() - _GGML_OBJECT_SIZE
    if size != ctypes.sizeof(_GgmlTensor):
        raise ModelError(f"this ggml's tensor struct is {size} bytes, edgeft reads {ctypes.sizeof(_GgmlTensor)}")
    libggml._edgeft_typed = True
    return libggml


def _op_index(lib: Any, name: bytes) -> int:
    """The ``enum ggml_op`` value named ``name``, searched from 0 (``ggml_op_name`` indexes a table
    without a bounds check, so the search stops at the first match)."""
    for i in range(200):
        if lib.ggml_op_name(i) == name:
            return i
    raise ModelError(f"this ggml has no {name.decode()} op")


class ActivationStats:
    """Per weight tensor: the sum over scored tokens of each input column's squared activation and the
    token count: what an importance matrix holds, here measured by llama.cpp on the GGUF itself, so
    every tensor llama.cpp multiplies by (the output head, tied or not, included) gets an entry."""

    def __init__(self, widths: dict[str, int]) -> None:
        self.widths = widths  # tensor name → input width (ne0): names outside it are ignored
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self._lib = _ggml()
        self._mul_mat = _op_index(self._lib, b"MUL_MAT")
        self._seen: dict[tuple[int, int], np.ndarray] = {}  # (data pointer, node) → squared sums, per decode

    def _weight_name(self, t: _GgmlTensor) -> str | None:
        if t.op != self._mul_mat or not t.src[0] or not t.src[1]:
            return None
        w = _GgmlTensor.from_address(t.src[0])
        if w.view_src:
            w = _GgmlTensor.from_address(w.view_src)
        name = w.name.decode(errors="replace")
        return name if self.widths.get(name) == w.ne[0] else None

    def callback(self, node: int, ask: bool, _user: int) -> bool:
        t = _GgmlTensor.from_address(node)
        name = self._weight_name(t)
        if ask:  # the scheduler asks first whether to stop after this node
            return name is not None
        if name is None:
            return True
        x = _GgmlTensor.from_address(t.src[1])
        if x.type != GGML_TYPE_F32:
            return True
        ne, nb = list(x.ne), list(x.nb)
        span = sum((n - 1) * s for n, s in zip(ne, nb)) + 4
        if self._lib.ggml_backend_buffer_is_host(x.buffer):
            raw = (ctypes.c_char * span).from_address(x.data)
        else:
            raw = ctypes.create_string_buffer(span)
            self._lib.ggml_backend_tensor_get(t.src[1], raw, 0, span)
        view = np.lib.stride_tricks.as_strided(
            np.frombuffer(raw, dtype=np.float32), shape=ne[::-1], strides=nb[::-1], writeable=False
        ).reshape(-1, ne[0])
        key = (x.data, t.src[1])
        sq = self._seen.get(key)
        if sq is None:  # q, k and v (gate and up) read the same input: square it once
            sq = np.einsum("ij,ij->j", view, view, dtype=np.float64)
            self._seen[key] = sq
        self.sums[name] = self.sums.get(name, 0.0) + sq
        self.counts[name] = self.counts.get(name, 0) + view.shape[0]
        return True

    def new_pass(self) -> None:
        self._seen.clear()

    def mean_squares(self) -> dict[str, np.ndarray]:
        return {n: (s / self.counts[n]).astype(np.float64) for n, s in sorted(self.sums.items())}


class Scorer:
    """A GGUF file in llama.cpp, scoring chunks of ``n_ctx`` tokens from position 0 (every position's logits)."""

    def __init__(self, gguf_path: Path, n_ctx: int, threads: int = 0, observe: ActivationStats | None = None) -> None:
        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)  # load chatter; failures raise below
        self._api = llama_cpp
        self.path = Path(gguf_path)
        self.n_ctx = n_ctx
        threads = threads if threads > 0 else usable_cores()
        mparams = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise ModelError(f"{self.path}: llama.cpp could not load it")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = threads
        # as LlamaCppRuntime (llama-cpp-python's Llama) scores: no flash attention, f16 KV cache
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._observe = observe
        self._callback = None
        if observe is not None:
            self._callback = llama_cpp.ggml_backend_sched_eval_callback(observe.callback)  # kept alive here
            cparams.cb_eval = self._callback
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ModelError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        for i in range(n_ctx):
            self._batch.pos[i] = i
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
            self._batch.logits[i] = 1

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """float32 ``[len(tokens), vocab]``, row i the next-token logits after ``tokens[: i + 1]``: a
        read-only view of llama.cpp's buffer, valid until the next call."""
        n = len(tokens)
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"need 1 to n_ctx={self.n_ctx} tokens, got {n}")
        api = self._api
        api.llama_memory_clear(api.llama_get_memory(self._ctx), True)
        ctypes.memmove(self._batch.token, np.ascontiguousarray(tokens, dtype=np.int32).ctypes.data, 4 * n)
        self._batch.n_tokens = n
        if self._observe is not None:
            self._observe.new_pass()
        rc = api.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise ModelError(f"{self.path}: llama_decode returned {rc}")
        ptr = api.llama_get_logits(self._ctx)
        out = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n, self.n_vocab))
        out.flags.writeable = False
        return out

    def close(self) -> None:
        if self._ctx:
            self._api.llama_batch_free(self._batch)
            self._api.llama_free(self._ctx)
            self._api.llama_model_free(self._model)
            self._ctx = None

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mean_kld(scorer: Scorer, chunks: np.ndarray, reference: TopKReference) -> float:
    """Mean top-k KL divergence of ``scorer``'s model from the reference over every position of ``chunks``."""
    total = 0.0
    for i, chunk in enumerate(chunks):
        total += float(reference.kld(i, scorer.logits(chunk)).sum())
    return total / chunks.size
