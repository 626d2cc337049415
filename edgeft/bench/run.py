"""Stage `bench`: measure one artifact against the full-precision reference; write report.json/md.

Reads top to bottom: load held-out data → fidelity (same token ids through both runtimes) → task
accuracy of base, reference and artifact (greedy, chat template, stop tokens) → decode latency of
reference and artifact at the same thread count. Gates are applied to the stored measurements.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..config import BenchConfig, GatesConfig
from ..data import load_jsonl
from ..stage import StageOutput, cached, content_hash, read_manifest, sha256_file, stage_key, staged_dir
from .fidelity import compare, reply_sequences, task_accuracy
from .gates import evaluate_gates
from .latency import measure_decode

SCHEMA_VERSION = 1
Progress = Callable[[str, int], Callable[[], None]]  # (description, total) -> advance()


def _no_progress(desc: str, total: int) -> Callable[[], None]:
    return lambda: None


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def _artifact_runtime(path: Path, threads: int, scoring: bool):
    from ..runtimes.llamacpp import LlamaCppRuntime

    return LlamaCppRuntime(path, n_threads=threads, scoring=scoring)


def measure(
    *,
    target: str,
    quant: str,
    artifact: Path,
    reference_dir: Path,
    base_dir: Path | None,
    eval_file: Path,
    cfg: BenchConfig,
    tensor_types: dict[str, int] | None = None,
    progress: Progress = _no_progress,
) -> dict[str, Any]:
    """Run every measurement and return the report dict (schema: docs in report.py)."""
    from ..runtimes.torch import TorchRuntime

    threads = cfg.threads or os.cpu_count() or 1
    examples = load_jsonl(eval_file, need_answers=True)
    if cfg.max_eval:
        examples = examples[: cfg.max_eval]
    questions = [ex.prompt for ex in examples]

    reference = TorchRuntime(reference_dir, threads=threads)
    scorer = _artifact_runtime(artifact, threads, scoring=True)
    sequences = reply_sequences(reference.tokenizer, examples)
    fidelity = compare(reference, scorer, sequences, progress("fidelity: logits of reference and artifact", len(sequences)))
    scorer.close()
    # Generation and timing run as an app would: logits of the last position only.
    art = _artifact_runtime(artifact, threads, scoring=False)

    step = progress("task accuracy: reference answers", 1)
    ref_replies = reference.generate_batch(questions, cfg.max_new_tokens)
    step()
    tick = progress("task accuracy: artifact answers", len(questions))
    art_gens = []
    for q in questions:
        art_gens.append(art.generate(q, cfg.max_new_tokens))
        tick()
    fidelity["task_accuracy_reference"] = task_accuracy(ref_replies, examples)
    fidelity["task_accuracy_artifact"] = task_accuracy([g.text for g in art_gens], examples)
    fidelity["artifact_stop_rate"] = sum(g.stopped for g in art_gens) / len(art_gens)

    step = progress("latency: reference and artifact", 2)
    ref_lat = measure_decode(reference, cfg.decode_tokens, cfg.repeats)
    step()
    art_lat = measure_decode(art, cfg.decode_tokens, cfg.repeats)
    step()
    reference.close()
    art.close()

    fidelity["task_accuracy_base"] = None
    if base_dir is not None:
        step = progress("task accuracy: base model answers", 1)
        base = TorchRuntime(base_dir, threads=threads)
        fidelity["task_accuracy_base"] = task_accuracy(base.generate_batch(questions, cfg.max_new_tokens), examples)
        base.close()
        step()

    samples = [
        {"question": q[-1]["content"], "expected": ex.reply, "reference": r, "artifact": g.text}
        for q, ex, r, g in list(zip(questions, examples, ref_replies, art_gens))[:5]
    ]
    size = Path(artifact).stat().st_size
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "edgeft_version": __version__,
        "target": target,
        "artifact": {
            "path": str(artifact),
            "format": "gguf",
            "quant": quant,
            "size_bytes": size,
            "sha256": sha256_file(artifact),
            "tensor_types": tensor_types or {},
        },
        "reference": {"path": str(reference_dir), "size_bytes": _dir_size(reference_dir), "dtype": "float32"},
        "fidelity": fidelity,
        "latency": {
            "threads": threads,
            "decode_tok_s": art_lat["decode_tok_s"]["median"],
            "reference_decode_tok_s": ref_lat["decode_tok_s"]["median"],
            "speedup": art_lat["decode_tok_s"]["median"] / ref_lat["decode_tok_s"]["median"],
            "artifact": art_lat,
            "reference": ref_lat,
        },
        "eval": {"file": str(eval_file), "examples": len(examples), "scored_positions": fidelity["positions"]},
        "samples": samples,
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count()},
    }
    return report


def judge(report: dict[str, Any], gates: GatesConfig) -> dict[str, Any]:
    """Apply the gates to a measured report (in place) and return it."""
    report["gates"] = evaluate_gates(report, gates)
    report["passed"] = all(g["passed"] for g in report["gates"])
    return report


def bench(
    *,
    target: str,
    quant: str,
    artifact: Path,
    reference_dir: Path,
    base_dir: Path | None,
    eval_file: Path,
    out_dir: Path,
    cfg: BenchConfig,
    tensor_types: dict[str, int] | None = None,
    progress: Progress = _no_progress,
) -> StageOutput:
    """Cached stage: the measurements, in ``out_dir/measurements.json`` and the manifest's results.

    Gates are applied afterwards (:func:`judge`), so changing a limit re-judges the stored
    measurements without measuring again.
    """
    import json
    from dataclasses import asdict

    inputs = {
        "artifact": content_hash(artifact),
        "reference": content_hash(reference_dir),
        "base": content_hash(base_dir) if base_dir else None,
        "eval": content_hash(eval_file),
    }
    params = {"target": target, "quant": quant, **asdict(cfg)}
    key = stage_key("bench", inputs, params)
    if hit := cached(out_dir, key):
        return hit
    with staged_dir(out_dir, "bench", key, inputs, params) as (tmp, results):
        report = measure(
            target=target, quant=quant, artifact=artifact, reference_dir=reference_dir, base_dir=base_dir,
            eval_file=eval_file, cfg=cfg, tensor_types=tensor_types, progress=progress,
        )
        results["report"] = report
        (tmp / "measurements.json").write_text(json.dumps(report, indent=2))
    return StageOutput(Path(out_dir), False, read_manifest(out_dir) or {})
