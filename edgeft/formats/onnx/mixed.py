"""Mixed int4/int8 ONNX under a size budget: per-MatMul bit widths chosen from measured sensitivity.

The same method as :mod:`edgeft.formats.gguf.mixed`, for onnxruntime's MatMulNBits:

1. stage ``sensitivity`` (:mod:`.sweep`): each quantizable MatMul of the fp32 export (one *group*
   per node: each layer's fused q/k/v projection, output projection, gate, up and down projections,
   and the LM head, which a tied embedding shares) gets the mean KL divergence its int4 rounding
   adds, every other MatMul at int8, against the fp32 model over every position of the calibration
   chunks (its top-256 log-probs). The probe model is the fp32 export with its MatMul weights
   turned into graph inputs, so one onnxruntime session serves every probe; weights are rounded
   through onnxruntime's own block quantizers (the kernels the builder calls) and fed in fp32
   (quantize, then dequantize), so what is measured is the weights' rounding; the int8 activations
   of ``accuracy_level = 4`` are common to every plan. A target with ``imatrix`` probes int4 as
   :mod:`.rounding` writes it instead. Cost: ``exact`` runs one probe per node (152 for
   SmolLM2-135M, each a forward pass over every chunk); ``proxy`` (what ``auto`` takes past three
   layers) probes the head, each role in every layer at once, each run of three layers and the 8
   nodes its fit finds most sensitive, and predicts the other nodes from their local rounding error
   (26 probes). Memory: one model's worth of int8-rounded weights, the fp32 ones read from the
   export's mapped file, and a top-k reference (SmolLM2-135M: 539 MB of arrays, was 1177 MB).
   ``sensitivity.json`` records the method, its probes and, for the proxy, every calibrating
   probe's measured and fitted figure; each option's ``source`` says whether it was probed or predicted.
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
from pathlib import Path
from typing import Any, Callable

from ...errors import ConfigError, ModelError
from ...precision_plan import check_fits, plan, write_sensitivity
from ...stage import StageOutput, content_hash, run_stage
from .graph import BLOCK, LEVELS, Layout, decoder
from .inspect import describe
from .rounding import read_importance
from .sweep import measure

SENSITIVITY_FILE = "sensitivity.json"

__all__ = ["plan", "SENSITIVITY_FILE", "LEVELS"]


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
    method: str = "auto",
) -> StageOutput:
    """Cached stage: fp32 export + the all-int4 export + calibration chunks → ``sensitivity.json``
    (int4 rounded by the importance in ``importance_dir`` when given, else as the builder rounds;
    ``method``: see :func:`.sweep.measure`)."""
    if not decoder(fp32_dir).is_file():
        raise ModelError(f"{fp32_dir}: expected the fp32 export's {decoder(fp32_dir).name} there")
    inputs = {"fp32": content_hash(fp32_dir), "int4": content_hash(int4_dir)}
    # the method is in the key even as "auto": sweeps before it scored full-vocabulary references
    params = {"mix": list(LEVELS), "block_size": BLOCK, "calibration": calibration.describe(), "method": method}
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
                method=method,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return {**write_sensitivity(tmp, result, SENSITIVITY_FILE), "method": result["method"]}

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
