"""Mixed precision under a size budget: per-tensor GGUF types chosen from measured sensitivity.

A target with ``max_size_mb`` (and optionally ``mix``, candidate tensor types from low to high)
goes through two steps after the F32 export:

1. stage ``sensitivity``: the tensors are grouped (the token embedding, the output head when it is
   not tied, each layer's attention, each layer's feed-forward), and for every group and every
   candidate type below the highest we need how much mean KL divergence against the F32 export
   (llama.cpp on both sides, every position of a few calibration chunks) lowering *only that group*
   to that type adds, everything else at the highest. llama.cpp quantizes the F32 file once per type
   (:mod:`.levels`); a probe file is assembled from those by copying tensor bytes. Past a few layers
   the layer groups' figures are predicted from each tensor's layer-local rounding error and
   calibrated by a few end-to-end probes rather than probed one by one (:mod:`.sweep` says how;
   ``sensitivity.json`` says which figures were measured and which predicted).
2. the plan: one type per group, chosen to minimise the summed added KLD with the whole file at most
   ``max_size_mb`` (:func:`edgeft.precision_plan.plan`, an exact multiple-choice knapsack over byte
   units; sizes are computed from the tensor shapes, not guessed). llama.cpp then writes that plan
   through ``tt_overrides`` in its C API, one exact-name pattern per tensor, in the usual ``quantize``
   stage, which scores the written file on the sweep's own tokens (:func:`confirm`).

Summing per-group effects assumes they add up, which holds while each is small against the whole;
the quantize manifest puts the measured KLD beside the predicted one so a reader can check it.

Types whose 256-value blocks do not divide a tensor's rows (K-quants on SmolLM2's 576-wide rows)
are replaced for that tensor by the 32-value-block type of the same size class (:data:`.types.FALLBACK`),
as llama.cpp itself does, so one ``mix`` fits every model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...errors import ConfigError, ModelError
from ...precision_plan import check_fits, write_sensitivity
from ...stage import StageOutput, content_hash, run_stage
from . import imatrix as im
from .inspect import GGUF_FILE
from .layout import Layout
from .scoring import TopKReference
from .sweep import measure, score
from .types import TENSOR_TYPES

SENSITIVITY_FILE = "sensitivity.json"

DEFAULT_MIX = ("Q4_K", "Q5_K", "Q8_0")


def check_mix(mix: Any, where: str) -> tuple[str, ...]:
    if not isinstance(mix, list) or len(mix) < 2 or not all(isinstance(t, str) for t in mix):
        raise ConfigError(f"{where}: mix: expected a list of two or more tensor types, low to high, got {mix!r}")
    for t in mix:
        if t not in TENSOR_TYPES:
            raise ConfigError(f"{where}: mix: unknown tensor type {t!r}; expected names from {', '.join(TENSOR_TYPES)}")
    bits = [TENSOR_TYPES[t][1] for t in mix]
    if any(b >= c for b, c in zip(bits, bits[1:])):
        raise ConfigError(f"{where}: mix: list the types from fewest to most bits per weight, got {mix!r}")
    return tuple(mix)


def check_budget(layout: Layout, mix: tuple[str, ...], max_size_mb: float) -> None:
    """Refuse, before any probe runs, a budget below the file with every tensor at the lowest type."""
    smallest = layout.fixed_bytes + sum(layout.nbytes(layout.types(g, mix[0])) for g in layout.groups)
    check_fits(int(max_size_mb * 1e6), smallest, mix[0])


# Tokens × weights multiplied per token that one probe scores at most: the default 2,048 calibration
# tokens up to a model of 1 B such weights, fewer above (whole chunks, at least one), so a probe's cost
# stops growing with the model. The end-to-end probes of a large model lower a tensor in every layer
# or a run of layers at once: a signal many times one group's.
PROBE_TOKEN_WEIGHTS = 2048 * 1_000_000_000
REFERENCE_FILES = ("reference-tokens.npy", "reference-topk-ids.npy", "reference-topk-logp.npy")


def multiplied_weights(layout: Layout) -> int:
    """Weights a forward pass multiplies by, per token: every quantizable tensor but a token embedding
    that is only looked up (an untied model has its own ``output`` head)."""
    untied = "output.weight" in layout.shapes
    return sum(math.prod(s) for n, s in layout.shapes.items() if not (untied and n == "token_embd.weight"))


def probe_set(calibration: Any, weights: int) -> Any:
    """``calibration``, or whole chunks spread over it, within :data:`PROBE_TOKEN_WEIGHTS`."""
    tokens = max(int(calibration.chunks.shape[1]), PROBE_TOKEN_WEIGHTS // max(1, weights))
    return calibration if calibration.chunks.size <= tokens else calibration.spread(tokens)


def sensitivity_stage(
    gguf_dir: Path,
    out_dir: Path,
    calibration: Any,
    mix: tuple[str, ...],
    threads: int = 0,
    imatrix_dir: Path | None = None,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    method: str = "auto",
) -> StageOutput:
    """Cached stage: F32 GGUF (+ imatrix) + calibration chunks → ``out_dir/sensitivity.json``, and the
    F32 export's top-k reference on the chunks scored (``reference-*.npy``), which the quantize stage
    scores the planned file against (:func:`confirm`)."""

    src = Path(gguf_dir) / GGUF_FILE
    if not src.is_file():
        raise ModelError(f"{gguf_dir}: expected an exported {GGUF_FILE} there")
    inputs = {"gguf": content_hash(gguf_dir)}
    matrix = None
    if imatrix_dir is not None:
        inputs["imatrix"] = content_hash(imatrix_dir)
        matrix = im.read(Path(imatrix_dir) / im.IMATRIX_FILE)
        im.check_matches(matrix, src, Path(imatrix_dir) / im.IMATRIX_FILE)
    params: dict[str, Any] = {"mix": list(mix), "calibration": calibration.describe()}
    if method != "auto":
        params["method"] = method

    def work(tmp: Path) -> dict[str, Any]:
        scored = probe_set(calibration, multiplied_weights(Layout.of(src)))
        result = measure(
            src, scored.chunks, mix, tmp, threads=threads, imatrix=matrix, progress=progress, method=method
        )
        arrays = result.pop("reference")
        for name, key in zip(REFERENCE_FILES, ("tokens", "topk_ids", "topk_logp")):
            np.save(tmp / name, arrays[key], allow_pickle=False)
        made = write_sensitivity(tmp, result, SENSITIVITY_FILE)
        return {**made, "method": result["method"], "scored": scored.describe()["recipe"].get("spread", "all")}

    return run_stage(out_dir, "sensitivity", inputs, params, work)


def confirm(gguf_path: Path, sensitivity_dir: Path, threads: int = 0) -> float | None:
    """Mean KL divergence of ``gguf_path`` against the F32 export on the sweep's own tokens (its stored
    top-k reference), comparable with ``base_kld`` + a plan's predicted added KLD; None for a sweep
    written without a reference."""
    paths = [Path(sensitivity_dir) / n for n in REFERENCE_FILES]
    if not all(p.is_file() for p in paths):
        return None
    tokens, ids, logp = (np.load(p, allow_pickle=False) for p in paths)
    return score(Path(gguf_path), tokens, TopKReference.from_arrays(ids, logp), threads)
