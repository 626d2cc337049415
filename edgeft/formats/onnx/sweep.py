"""The ONNX sensitivity sweep's measurement: one onnxruntime session of the fp32 export with its
MatMul weights as graph inputs, scored against the fp32 model's top-k reference (see :mod:`.mixed`
for the stage and the plan).

Memory: the probe holds one model's worth of weights, the int8-rounded copy every probe starts from
(each weight rounded once as it is read). The fp32 weights stay in the export's external-data file,
memory-mapped: the reference pass and a probed node's int4 rounding read them from there (page cache,
not the process's own memory). The reference is each position's top-k log-probs
(:class:`~edgeft.divergence.TopKReference`), not full-vocabulary rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...divergence import TopKReference
from .graph import BLOCK, LEVELS, ChunkSession, Layout, decoder, inline_external
from .rounding import fake_quant as weighted_int4


def fake_quant(w: np.ndarray, bits: int, block: int = BLOCK) -> np.ndarray:
    """``w`` [K, N] rounded as MatMulNBits stores it (symmetric, block-wise along K), back in fp32.

    The rounding is onnxruntime's own C++ kernel, the one its MatMulNBitsQuantizer calls; only the
    unpacking is ours: blocks are [N, k_blocks, block·bits/8] bytes, low nibble first for 4 bits,
    stored unsigned with the zero point at the middle of the range (8, or 128) and one scale a block.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w.shape
    k_blocks = -(-k // block)
    padded = np.zeros((k_blocks * block, n), dtype=np.float32)
    padded[:k] = w
    packed = np.zeros((n, k_blocks, block * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-k_blocks * bits // 8)), dtype=np.uint8)
    quant = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quant(packed, padded, scales, zero_points, block, n, k_blocks * block, True)
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k_blocks, block)
    else:
        q = packed
    values = (q.astype(np.float32) - (1 << (bits - 1))) * scales[:, :, None]
    return np.ascontiguousarray(values.reshape(n, -1)[:, :k].T)


class Fp32Weights:
    """An export's weight initializers, read on demand: views of its external-data files, mapped
    read-only (nothing is copied into the process), or, for a weight kept inside the graph file,
    the array decoded from it."""

    def __init__(self, folder: Path, model, names: set[str]):
        import onnx
        from onnx import TensorProto, numpy_helper

        self._files: dict[str, np.memmap] = {}
        self._external: dict[str, tuple[str, int, tuple[int, ...], np.dtype]] = {}
        self._inline: dict[str, np.ndarray] = {}
        for init in model.graph.initializer:
            if init.name not in names:
                continue
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
            if init.data_location == TensorProto.EXTERNAL:
                info = {e.key: e.value for e in init.external_data}
                location = info["location"]
                if location not in self._files:
                    self._files[location] = np.memmap(Path(folder) / location, dtype=np.uint8, mode="r")
                self._external[init.name] = (location, int(info.get("offset", 0)), tuple(init.dims), dtype)
            else:  # small models keep some initializers in the graph file itself
                self._inline[init.name] = numpy_helper.to_array(init)

    def names(self) -> list[str]:
        return [*self._external, *self._inline]

    def __getitem__(self, name: str) -> np.ndarray:
        """fp32 ``[K, N]``: a read-only view of the mapped file when stored as fp32 there."""
        if name in self._inline:
            w = self._inline[name]
        else:
            location, offset, dims, dtype = self._external[name]
            w = np.ndarray(dims, dtype=dtype, buffer=self._files[location], offset=offset)
        return w.astype(np.float32, copy=False)


class ProbeModel:
    """The fp32 export with its MatMul weights as graph inputs: one session, any rounding of them.

    ``base`` holds every weight rounded through the int8 quantizer (the one copy of the model the
    probe keeps); ``fp32`` reads the export's own weights from its mapped file."""

    def __init__(self, folder: Path, scratch: Path, threads: int = 0):
        import onnx

        model = onnx.load(str(decoder(folder)), load_external_data=False)
        self.layout = Layout.of(model)
        names = set(self.layout.weights.values())
        self.fp32 = Fp32Weights(folder, model, names)
        self.base: dict[str, np.ndarray] = {}
        kept = []
        for init in model.graph.initializer:
            if init.name in names:
                self.base[init.name] = fake_quant(self.fp32[init.name], 8)
                model.graph.input.append(
                    onnx.helper.make_tensor_value_info(init.name, onnx.TensorProto.FLOAT, init.dims)
                )
            else:
                kept.append(init)
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        inline_external(model, Path(folder))  # the rest: norms, rotary caches, an untied embedding
        self.session = ChunkSession(model, folder, scratch, "probe", threads)
        del model, kept  # the session has its own copy of the graph

    def logits(self, chunk: np.ndarray, changed: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """[positions, vocab] with ``changed`` weights (name → fp32 values) fed over the int8 base."""
        return self.session.run(["logits"], chunk, {**self.base, **(changed or {})})[0][0]

    def reference(self, chunks: np.ndarray) -> TopKReference:
        """The fp32 model's top-k log-probs on ``chunks``."""
        reference = TopKReference()
        fp32 = {name: self.fp32[name] for name in self.base}
        for chunk in chunks:
            reference.add(self.logits(chunk, fp32))
        return reference

    def kld(self, chunks: np.ndarray, reference: TopKReference, changed: dict[str, np.ndarray] | None = None) -> float:
        """Mean top-k KL divergence from the reference over every position of ``chunks``."""
        total = 0.0
        for i, chunk in enumerate(chunks):
            total += float(reference.kld(i, self.logits(chunk, changed)).sum())
        return total / chunks.size


def measure(
    fp32_folder: Path,
    chunks: np.ndarray,
    scratch: Path,
    fixed_bytes: int,
    *,
    threads: int = 0,
    shared_embedding: bool = True,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    importance: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Every MatMul's added KLD at int4 with the rest at int8 (see :mod:`.mixed`).
    ``shared_embedding``: whether the int4 file's embedding reads the head's int4 weights;
    ``importance``: node → column importance when int4 is rounded by it (see :mod:`.rounding`)."""

    probe = ProbeModel(fp32_folder, scratch, threads)
    layout = probe.layout
    if not shared_embedding:
        layout.tied_embedding = None  # the embedding is its own table at every head width
    start = time.perf_counter()
    reference = probe.reference(chunks)
    base = probe.kld(chunks, reference)
    advance = progress("sensitivity", len(layout.weights)) if progress else (lambda: None)
    groups = []
    for node, weight in layout.weights.items():
        w = probe.fp32[weight]
        int4 = weighted_int4(w, importance[node]) if importance is not None else fake_quant(w, 4)
        added = probe.kld(chunks, reference, {weight: int4}) - base
        groups.append(
            {
                "name": node,
                "shape": list(layout.shapes[node]),
                "options": [
                    {"level": "int4", "bytes": layout.option_bytes(node, "int4"), "added_kld": added},
                    {"level": "int8", "bytes": layout.option_bytes(node, "int8"), "added_kld": 0.0},
                ],
            }
        )
        advance()
    return {
        "mix": list(LEVELS),
        "base_kld": base,
        "positions": int(chunks.size),
        "reference_top_k": reference.k,
        "fixed_bytes": int(fixed_bytes),
        "tied_embedding": list(layout.tied_embedding) if layout.tied_embedding else None,
        "groups": groups,
        "probes": 1 + len(groups),
        "seconds": round(time.perf_counter() - start, 1),
    }
