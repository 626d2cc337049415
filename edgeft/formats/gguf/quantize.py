"""Stage `quantize` for GGUF: llama.cpp's own quantizer (:mod:`.llama_quantize`) on the F32 export.

The requested type is a *mix*: llama.cpp chooses per-tensor types (and falls back when a row width is
not a multiple of a K-quant's 256-value block), so the stage records the tensor types actually
written, read back from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import ConfigError, ModelError
from ...precision_plan import plan as choose
from ...stage import StageOutput, content_hash, read_manifest, run_stage
from . import imatrix as im
from . import mixed
from .inspect import GGUF_FILE, check_gguf, tensor_type_counts
from .layout import Layout, assign
from .llama_quantize import quantize_file


def quantize(
    gguf_dir: Path,
    out_dir: Path,
    quant: str,
    threads: int = 0,
    imatrix_dir: Path | None = None,
    sensitivity_dir: Path | None = None,
    max_size_mb: float | None = None,
) -> StageOutput:
    """Cached stage: ``gguf_dir/model.gguf`` → ``out_dir/model.gguf`` in type ``quant``, weighted by
    ``imatrix_dir``'s importance matrix when given (its hash and its calibration set's go into the
    GGUF header and the manifest). With ``sensitivity_dir`` (see :mod:`.mixed`), every tensor gets
    the type of a plan that fits ``max_size_mb``."""
    src = Path(gguf_dir) / GGUF_FILE
    if not src.is_file():
        raise ModelError(f"{gguf_dir}: expected an exported {GGUF_FILE} there")
    check_gguf(src)  # llama.cpp's quantizer reads it next: every count checked against the file
    inputs = {"gguf": content_hash(gguf_dir)}
    params: dict[str, Any] = {"quant": quant}
    matrix, metadata, provenance = None, None, {}
    tensor_types, plan, sensitivity = None, None, {}
    if sensitivity_dir is not None:
        if max_size_mb is None:
            raise ConfigError("a mixed-precision quantization needs max_size_mb")
        inputs["sensitivity"] = content_hash(sensitivity_dir)
        params["max_size_mb"] = max_size_mb
        sensitivity = json.loads((Path(sensitivity_dir) / mixed.SENSITIVITY_FILE).read_text())
        plan = choose(sensitivity, int(max_size_mb * 1e6))
        tensor_types = assign(Layout.of(src), plan["levels"])
    if imatrix_dir is not None:
        inputs["imatrix"] = content_hash(imatrix_dir)
        matrix = im.read(Path(imatrix_dir) / im.IMATRIX_FILE)
        im.check_matches(matrix, src, Path(imatrix_dir) / im.IMATRIX_FILE)
        # a planned mix was measured with the matrix on every tensor, so it is quantized that way
        scope = "all"
        if tensor_types is None:
            matrix, scope = im.scope(matrix, src, quant)
        params["imatrix_tensors"] = scope
        provenance, metadata = _imatrix_record(Path(imatrix_dir), scope, len(matrix))

    def work(tmp: Path) -> dict[str, Any]:
        out = tmp / GGUF_FILE
        quantize_file(src, out, quant, threads, imatrix=matrix, metadata=metadata, tensor_types=tensor_types)
        size = out.stat().st_size
        results: dict[str, Any] = {"tensor_types": tensor_type_counts(out), "size_bytes": size, **provenance}
        if plan is not None:
            if size > plan["max_bytes"]:  # the plan's sizes come from the shapes: a bug, not bad input
                raise RuntimeError(f"mixed plan predicted {plan['predicted_bytes']} bytes, llama.cpp wrote {size}")
            # the written file scored on the sweep's own tokens, beside what the sweep predicted for it
            measured = mixed.confirm(out, sensitivity_dir, threads)
            if measured is not None:
                predicted = sensitivity["base_kld"] + plan["predicted_added_kld"]
                results["mixed"] = {**plan, "predicted_kld": predicted, "measured_kld": measured}
            else:
                results["mixed"] = plan
        return results

    return run_stage(out_dir, "quantize", inputs, params, work)


def _imatrix_record(imatrix_dir: Path, scope: str, count: int) -> tuple[dict[str, Any], dict[str, str | int]]:
    """What the manifest records of the importance matrix used (``count`` tensors under rule
    ``scope``), and the GGUF header keys that say the same."""
    made = (read_manifest(imatrix_dir) or {}).get("results", {})
    calib = made.get("calibration") or {}
    provenance = {
        "imatrix_tensors": {"rule": scope, "count": count},
        "imatrix_sha256": made.get("imatrix_sha256"),
        "calibration_sha256": calib.get("sha256"),
        "calibration_source": calib.get("source"),
    }
    # the keys llama-quantize writes, plus the two hashes that say exactly what was used
    metadata: dict[str, str | int] = {
        "quantize.imatrix.file": im.IMATRIX_FILE,
        "quantize.imatrix.dataset": f"edgeft calibration {calib.get('source')}",
        "quantize.imatrix.entries_count": count,
        "quantize.imatrix.chunks_count": int(calib.get("chunks") or 0),
        "edgeft.imatrix.sha256": str(provenance["imatrix_sha256"]),
        "edgeft.calibration.sha256": str(provenance["calibration_sha256"]),
    }
    return provenance, metadata
