"""Mixed int4/int8 ONNX under a size budget: per-MatMul bit widths chosen from measured sensitivity.

The same method as :mod:`edgeft.formats.gguf.mixed`, for onnxruntime's MatMulNBits:

1. stage ``sensitivity``: every quantizable MatMul of the fp32 export (one *group* per node: each
   layer's fused q/k/v projection, output projection, gate, up and down projections, and the LM
   head, which a tied embedding shares) is probed on its own. The probe model is the fp32 export
   with its MatMul weights turned into graph inputs, so one onnxruntime session serves every probe:
   all weights are fed rounded through onnxruntime's own int8 block quantizer (the kernel the builder
   calls), except the probed node's, fed rounded through its int4 quantizer. The added mean KL
   divergence against the fp32 model, over every position of the calibration chunks, is that node's
   sensitivity. Rounding is simulated in fp32 (quantize, then dequantize), so what is measured is the
   weights' rounding; the int8 activations of ``accuracy_level = 4`` are common to every plan. A
   target with ``imatrix`` probes int4 as :mod:`.rounding` writes it instead.
2. the plan: :func:`edgeft.precision_plan.plan`, the exact knapsack the GGUF path uses, over the
   bytes each node's MatMulNBits initializers take at each width (computed from the shapes).
3. the builder writes the plan: the int4 export with an exact-name ``int8`` override per promoted node
   (``quant_config.weights.overrides``, onnxruntime-genai 0.18's structured options).

The head is a special case when the embedding is tied: at int4 the builder's GatherBlockQuantized
reads the head's quantized weights, at int8 it cannot (GatherBlockQuantized takes 4 bits only with
the builder's default quantizer) and the embedding stays an fp32 table. The head's int8 option is
priced with that table, so a budget near the int4 file never picks it unless it pays.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...divergence import kl_divergence
from ...errors import ConfigError, ModelError
from ...precision_plan import check_fits, plan, write_sensitivity
from ...stage import StageOutput, content_hash, run_stage
from .graph import BLOCK, LEVELS, ChunkSession, Layout, decoder, load_decoder
from .inspect import describe
from .rounding import fake_quant as weighted_int4
from .rounding import read_importance

SENSITIVITY_FILE = "sensitivity.json"

__all__ = ["plan", "SENSITIVITY_FILE", "LEVELS"]


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


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class ProbeModel:
    """The fp32 export with its MatMul weights as graph inputs: one session, any rounding of them."""

    def __init__(self, folder: Path, scratch: Path, threads: int = 0):
        import onnx
        from onnx import numpy_helper

        model = load_decoder(folder)
        self.layout = Layout.of(model)
        names = set(self.layout.weights.values())
        self.fp32: dict[str, np.ndarray] = {}
        kept = []
        for init in model.graph.initializer:
            if init.name in names:
                self.fp32[init.name] = numpy_helper.to_array(init).astype(np.float32, copy=False)
                model.graph.input.append(
                    onnx.helper.make_tensor_value_info(init.name, onnx.TensorProto.FLOAT, init.dims)
                )
            else:
                kept.append(init)
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        self.session = ChunkSession(model, folder, scratch, "probe", threads)

    def log_probs(self, chunk: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
        return _log_softmax(self.session.run(["logits"], chunk, weights)[0][0])


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
    """Every MatMul's added KLD at int4 with the rest at int8 (see the module docstring).
    ``shared_embedding``: whether the int4 file's embedding reads the head's int4 weights;
    ``importance``: node → column importance when int4 is rounded by it (see :mod:`.rounding`)."""

    probe = ProbeModel(fp32_folder, scratch, threads)
    layout = probe.layout
    if not shared_embedding:
        layout.tied_embedding = None  # the embedding is its own table at every head width
    ref = [probe.log_probs(c, probe.fp32) for c in chunks]
    int8 = {w: fake_quant(a, 8) for w, a in probe.fp32.items()}

    def kld_with(weights: dict[str, np.ndarray]) -> float:
        total = 0.0
        for chunk, lr in zip(chunks, ref):
            la = probe.log_probs(chunk, weights)
            total += float(kl_divergence(lr, la).sum())
        return total / chunks.size

    start = time.perf_counter()
    base = kld_with(int8)
    advance = progress("sensitivity", len(layout.weights)) if progress else (lambda: None)
    groups = []
    for node, weight in layout.weights.items():
        w = probe.fp32[weight]
        int4 = weighted_int4(w, importance[node]) if importance is not None else fake_quant(w, 4)
        added = kld_with({**int8, weight: int4}) - base
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
        "fixed_bytes": int(fixed_bytes),
        "tied_embedding": list(layout.tied_embedding) if layout.tied_embedding else None,
        "groups": groups,
        "probes": 1 + len(groups),
        "seconds": round(time.perf_counter() - start, 1),
    }


def fixed_bytes(int4_folder: Path, fp32_folder: Path) -> int:
    """Bytes of the shipped int4 folder that no plan changes (graph, norms, tokenizer, an untied
    embedding): the all-int4 folder's size (as reported) less its MatMulNBits initializers, with
    room for the larger graph a mixed file writes (node names and attributes per promoted node)."""
    import onnx

    layout = Layout.of(onnx.load(str(decoder(fp32_folder)), load_external_data=False))
    total = describe(int4_folder)["size_bytes"]
    return total - sum(layout.option_bytes(n, "int4") for n in layout.shapes) + 4096 + 256 * len(layout.shapes)


def budget_bytes(options: dict[str, Any], sensitivity: dict[str, Any]) -> int:
    """``max_size_mb`` (10^6 bytes), or ``max_size_ratio`` × the all-int4 file."""
    if "max_size_mb" in options:
        return int(options["max_size_mb"] * 1e6)
    all_int4 = sensitivity["fixed_bytes"] + sum(g["options"][0]["bytes"] for g in sensitivity["groups"])
    return int(options["max_size_ratio"] * all_int4)


def overrides(levels: dict[str, str]) -> list[dict[str, Any]]:
    """A plan's promoted nodes as the builder's exact-name weight overrides."""
    return [{"match": {"name": node}, "type": level} for node, level in sorted(levels.items()) if level != "int4"]


def sensitivity_stage(
    fp32_dir: Path,
    int4_dir: Path,
    out_dir: Path,
    calibration: Any,
    threads: int = 0,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    importance_dir: Path | None = None,
) -> StageOutput:
    """Cached stage: fp32 export + the all-int4 export + calibration chunks → ``sensitivity.json``
    (int4 rounded by the importance in ``importance_dir`` when given, else as the builder rounds)."""
    if not decoder(fp32_dir).is_file():
        raise ModelError(f"{fp32_dir}: expected the fp32 export's {decoder(fp32_dir).name} there")
    inputs = {"fp32": content_hash(fp32_dir), "int4": content_hash(int4_dir)}
    params = {"mix": list(LEVELS), "block_size": BLOCK, "calibration": calibration.describe()}
    if importance_dir is not None:
        inputs["importance"] = content_hash(importance_dir)
        params["int4_rounding"] = "importance-weighted"

    def work(tmp: Path) -> dict[str, Any]:

        # shared_embeddings = false keeps the table fp32 in the int4 folder already: the head's
        # int8 option then costs no table of its own
        shared = any(t.startswith("GatherBlockQuantized") for t in describe(int4_dir)["tensor_types"])
        scratch = tmp / ".probe"
        scratch.mkdir()
        try:
            result = measure(
                fp32_dir,
                calibration.chunks,
                scratch,
                fixed_bytes(int4_dir, fp32_dir),
                threads=threads,
                shared_embedding=shared,
                progress=progress,
                importance=read_importance(importance_dir) if importance_dir is not None else None,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return write_sensitivity(tmp, result, SENSITIVITY_FILE)

    return run_stage(out_dir, "sensitivity", inputs, params, work)


def read_plan(sensitivity_dir: Path, options: dict[str, Any], where: str) -> dict[str, Any]:
    """The plan for a target's budget from a finished sensitivity stage."""
    sensitivity = json.loads((Path(sensitivity_dir) / SENSITIVITY_FILE).read_text())
    try:
        return plan(sensitivity, budget_bytes(options, sensitivity))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_budget(options: dict[str, Any], fp32_dir: Path, int4_dir: Path) -> None:
    """Refuse, before the sweep, a budget below the all-int4 file."""
    import onnx

    if "max_size_mb" not in options:
        return  # a ratio ≥ 1 of the all-int4 file always fits it
    layout = Layout.of(onnx.load(str(decoder(fp32_dir)), load_external_data=False))
    smallest = fixed_bytes(int4_dir, fp32_dir) + sum(layout.option_bytes(n, "int4") for n in layout.shapes)
    check_fits(int(options["max_size_mb"] * 1e6), smallest, "int4")


def check_written(folder: Path, chosen: dict[str, Any]) -> None:
    """The written folder is within the plan's budget; a larger one is our bug, not the user's input."""

    size = describe(folder)["size_bytes"]
    if size > chosen["max_bytes"]:
        raise RuntimeError(
            f"{folder}: {size} bytes written for a plan of {chosen['predicted_bytes']} within {chosen['max_bytes']}"
        )
