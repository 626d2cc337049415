"""An onnxruntime-genai folder's decoder graph as the mixed-precision path and the importance-weighted
rounding read it: its quantizable MatMuls and what each takes at a bit width, the graph with its
external data read in, and an edited copy run on calibration chunks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .inspect import genai_config

LEVELS: dict[str, int] = {"int4": 4, "int8": 8}  # mix level → MatMulNBits bits
BLOCK = 32  # the builder's default block size; a mixed target keeps it
HEAD = "/lm_head/MatMul"


def decoder(folder: Path) -> Path:
    """The decoder graph's path in an onnxruntime-genai folder."""
    return Path(folder) / genai_config(folder)["model"]["decoder"]["filename"]


def matmul_bytes(k: int, n: int, bits: int, block: int = BLOCK) -> int:
    """MatMulNBits initializers of a [K, N] weight: packed values and one fp32 scale per block."""
    k_blocks = -(-k // block)
    return n * k_blocks * (block * bits // 8) + n * k_blocks * 4


@dataclass
class Layout:
    """The quantizable MatMuls of an fp32 export (node name → weight initializer and [K, N] shape)."""

    weights: dict[str, str]
    shapes: dict[str, tuple[int, int]]
    tied_embedding: tuple[int, int] | None  # (vocab, hidden) when the embedding reads the head's weight

    @classmethod
    def of(cls, model) -> Layout:
        inits = {i.name: tuple(int(d) for d in i.dims) for i in model.graph.initializer}
        weights, shapes = {}, {}
        for node in model.graph.node:
            if node.op_type == "MatMul" and len(node.input) == 2 and len(inits.get(node.input[1], ())) == 2:
                weights[node.name] = node.input[1]
                shapes[node.name] = inits[node.input[1]]
        tied = None
        head = weights.get(HEAD)
        if head is not None:
            produced_by = {o: n for n in model.graph.node for o in n.output}
            for node in model.graph.node:  # the builder's tied fp32 graph: Gather(Transpose(head weight))
                src = produced_by.get(node.input[0]) if node.op_type == "Gather" else None
                if src is not None and src.op_type == "Transpose" and src.input[0] == head:
                    tied = (shapes[HEAD][1], shapes[HEAD][0])
        return cls(weights, shapes, tied)

    def option_bytes(self, node: str, level: str) -> int:
        k, n = self.shapes[node]
        size = matmul_bytes(k, n, LEVELS[level])
        if node == HEAD and self.tied_embedding and level != "int4":
            size += self.tied_embedding[0] * self.tied_embedding[1] * 4  # the embedding table, untied, fp32
        return size


def load_decoder(folder: Path):
    """A folder's decoder graph with every initializer's data read in.

    onnx.load refuses external data with more than one hard link, and stage outputs are hard-linked
    from the cache: the data is read here instead (see :func:`inline_external`)."""
    import onnx

    model = onnx.load(str(decoder(folder)), load_external_data=False)
    inline_external(model, Path(folder))
    return model


def inline_external(model, base: Path) -> None:
    """Inline every initializer's external data (location, offset, length) from files under ``base``."""
    from onnx import TensorProto  # optional (the onnx extra), as in every function here

    files: dict[str, np.memmap] = {}
    for init in model.graph.initializer:
        if init.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        data = files.setdefault(info["location"], np.memmap(base / info["location"], dtype=np.uint8, mode="r"))
        offset = int(info.get("offset", 0))
        length = int(info.get("length", len(data) - offset))
        init.raw_data = data[offset : offset + length].tobytes()
        del init.external_data[:]
        init.data_location = TensorProto.DEFAULT


class ChunkSession:
    """An edited copy of a folder's decoder graph, saved under ``scratch`` and run by onnxruntime on
    whole calibration chunks from an empty KV cache (the sweep's probes, the importance measurement)."""

    def __init__(self, model, folder: Path, scratch: Path, stem: str, threads: int = 0):
        import onnx
        import onnxruntime as ort

        path = Path(scratch) / f"{stem}.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location=f"{stem}.onnx.data")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        d = genai_config(folder)["model"]["decoder"]
        # no past: [batch, kv heads, 0 positions, head size]
        empty = np.zeros((1, int(d["num_key_value_heads"]), 0, int(d["head_size"])), dtype=np.float32)
        self.past = {i.name: empty for i in self.session.get_inputs() if i.name.startswith("past_key_values")}

    def run(self, outputs: list[str], chunk: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> list:
        ids = np.asarray(chunk, dtype=np.int64)[None]
        feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": np.ones_like(ids), **self.past, **(extra or {})}
        return self.session.run(outputs, feeds)
