"""Bench stages: the stored reference (torch), each artifact against it (no torch), the base model.

* ``reference`` — runs the fine-tuned model once, in fp32 (or bf16 where fp32 does not fit, see
  :func:`edgeft.resources.reference_dtype`): top-k next-token log-probs on the held-out replies, its
  greedy answers and task accuracy, and its own latency and memory (in a subprocess). The folder it
  writes is all a device needs to benchmark an artifact; its meta says the dtype.
* ``bench`` — one artifact against a stored reference: fidelity, task accuracy, golden prompts,
  latency and memory in the runtime's own subprocess, weight bytes per token. Imports no torch.
* ``bench-base`` — the base model's row of the fidelity ladder (torch): how far fine-tuning moved it.
* ``bench-adapter-nf4`` — QLoRA builds: the adapter on its 4-bit NF4 base (torch), the model as it was
  trained: how much the merge and everything after it moved away from it.

Each is a cached stage (dir + manifest). Gates are applied later, to the stored measurements.
"""

from __future__ import annotations

from dataclasses import asdict
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

from ..config import BenchConfig
from ..data import is_correct, load_jsonl
from ..formats import detect_artifact
from ..machine import describe, usable_cores
from ..merge import trained_on
from ..nf4 import adapter_on_nf4
from ..resources import ReferenceDtype
from ..runtimes import load_runtime
from ..runtimes.torch import TorchRuntime
from ..stage import StageOutput, content_hash, run_stage
from . import reference as stored_reference
from .fidelity import compare_stored, perplexity, reply_sequences, task_accuracy
from .probe import run_probe

Progress = Callable[[str, int], Callable[[], None]]  # (description, total) -> advance()
FP32 = ReferenceDtype()


def _no_progress(desc: str, total: int) -> Callable[[], None]:
    return lambda: None


def _threads(cfg: BenchConfig) -> int:
    return cfg.threads or usable_cores()


def _machine() -> dict[str, Any]:
    return describe()


def _probe(
    runtime: str,
    model: Path,
    cfg: BenchConfig,
    prompt_tokens: int | None = None,
    decode_tokens: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Time ``model`` in its runtime's own process; lengths default to the config's."""
    return run_probe(
        runtime,
        model,
        _threads(cfg),
        prompt_tokens or cfg.prompt_tokens,
        decode_tokens or cfg.decode_tokens,
        cfg.repeats,
        dtype=dtype,
    )


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def _answers(examples, replies: list[str], stops: list[bool] | None = None) -> list[dict[str, Any]]:
    return [
        {"reply": r, "correct": is_correct(r, ex.answers), **({"stopped": s} if stops is not None else {})}
        for ex, r, s in zip(examples, replies, stops or [None] * len(replies))
    ]


# --------------------------------------------------------------------------------------------
# reference (torch)


def measure_reference(
    reference_dir: Path, eval_file: Path, cfg: BenchConfig, out: Path, progress: Progress, dtype: ReferenceDtype
) -> dict:
    examples = load_jsonl(eval_file, need_answers=True)
    if cfg.max_eval:
        examples = examples[: cfg.max_eval]
    rt = TorchRuntime(reference_dir, threads=_threads(cfg), dtype=dtype.name)
    sequences = reply_sequences(rt.tokenizer, examples)
    arrays = stored_reference.record(rt, sequences, cfg.top_k, progress("reference: top-k log-probs", len(sequences)))
    step = progress("reference: answers to held-out questions", 1)
    replies = rt.generate_batch([ex.prompt for ex in examples], cfg.max_new_tokens)
    step()
    rt.close()
    step = progress("reference: latency and memory (subprocess)", 1)
    perf = _probe("torch", reference_dir, cfg, dtype=dtype.name)
    step()
    nll = [-float(x) for a in arrays["target_logp"] for x in a]

    ppl, err = perplexity(nll)
    meta = {
        "top_k": cfg.top_k,
        "model": str(reference_dir),
        "model_size_bytes": _dir_size(reference_dir),
        "dtype": dtype.name,  # what torch computed it in; the folder's weights are fp32 either way
        **({"dtype_reason": dtype.why} if dtype.why else {}),
        "eval_file": str(eval_file),
        "examples": [{"messages": ex.messages, "answers": ex.answers} for ex in examples],
        "answers": _answers(examples, replies),
        "task_accuracy": task_accuracy(replies, examples),
        "perplexity": ppl,
        "perplexity_err": err,
        "positions": len(nll),
        "runtime_version": perf["latency"]["runtime_version"],
        "performance": perf,
        "machine": _machine(),
    }
    stored_reference.save(out, arrays, meta)
    return {"task_accuracy": meta["task_accuracy"], "perplexity": ppl, "positions": len(nll), "dtype": dtype.name}


def retime_reference(ref_meta: dict[str, Any], cfg: BenchConfig) -> dict[str, Any] | None:
    """The reference's speed and memory timed again, now, with the stored prompt and decode lengths.

    The reference stage is cached, so without this a build that benches a new artifact would
    divide today's artifact speed by a reference speed from an earlier run (perhaps another
    machine, or the same one under other load). None when the fp32 model is not on this machine
    (``edgeft bench`` on a device with only the stored reference folder) or torch is missing.
    """
    model = Path(ref_meta["model"])
    try:
        has_torch = find_spec("torch") is not None
    except (ImportError, ValueError):  # an import hook that forbids it, a half-removed install
        has_torch = False
    if not (model / "config.json").is_file() or not has_torch:
        return None
    lat = ref_meta["performance"]["latency"]
    return _probe("torch", model, cfg, lat["prompt_tokens"], lat["decode_tokens"], ref_meta.get("dtype", "float32"))


def reference(
    reference_dir: Path,
    eval_file: Path,
    out_dir: Path,
    cfg: BenchConfig,
    progress: Progress = _no_progress,
    dtype: ReferenceDtype = FP32,
) -> StageOutput:
    """Cached stage; ``dtype``: the plan's (``[bench].reference_dtype`` resolved for this machine)."""
    inputs = {"reference": content_hash(reference_dir), "eval": content_hash(eval_file)}
    return run_stage(
        out_dir,
        "reference",
        inputs,
        _torch_params(_params(cfg), dtype),
        lambda tmp: measure_reference(reference_dir, eval_file, cfg, tmp, progress, dtype),
    )


def _params(cfg: BenchConfig) -> dict[str, Any]:
    params = asdict(cfg)
    if not params.get("sustained_s"):
        del params["sustained_s"]  # off: stages cached before the option existed stay valid
    # `auto` is resolved per machine; the torch stages key on what it resolved to (_torch_params), and
    # the stages measured against the reference on its content
    del params["reference_dtype"]
    return params


def _torch_params(params: dict[str, Any], dtype: ReferenceDtype) -> dict[str, Any]:
    """A whole-model torch stage's key: a bf16 run is never reused as fp32 or the other way round.
    fp32 adds nothing, so stages cached before the option existed stay valid."""
    return params if dtype.name == "float32" else {**params, "dtype": dtype.name}


# What a bench stage's results hold; bumped when a report starts to need something they lacked, so
# stages cached before are measured again instead of reporting without it. 2: per-sequence sums and
# the KLD / top-1 intervals.
RESULTS_VERSION = 2


def _bench_params(cfg: BenchConfig) -> dict[str, Any]:
    return {**_params(cfg), "results_version": RESULTS_VERSION}


# --------------------------------------------------------------------------------------------
# one artifact (no torch)


def measure_artifact(artifact: Path, ref_dir: Path, cfg: BenchConfig, progress: Progress) -> dict[str, Any]:
    fmt, artifact = detect_artifact(artifact)
    stored = stored_reference.load(ref_dir)
    threads = _threads(cfg)
    scorer = load_runtime(fmt.RUNTIME, artifact, threads=threads, scoring=True)
    fidelity = compare_stored(stored, scorer, progress("artifact: logits", len(stored.tokens)))
    scorer.close()

    # Answers are generated as an app would: last-position logits only, the artifact's template and stops.
    gen = load_runtime(fmt.RUNTIME, artifact, threads=threads, scoring=False)
    examples = stored.examples
    tick = progress("artifact: answers to held-out questions", len(examples))
    outs = []
    for ex in examples:
        outs.append(gen.generate(ex.prompt, cfg.max_new_tokens))
        tick()
    gen.close()
    replies = [g.text for g in outs]
    fidelity["task_accuracy_artifact"] = task_accuracy(replies, examples)
    fidelity["task_accuracy_reference"] = stored.meta["task_accuracy"]
    fidelity["artifact_stop_rate"] = sum(g.stopped for g in outs) / len(outs)

    step = progress("artifact: latency and memory (subprocess)", 1)
    # Same prompt and decode lengths as the stored reference was timed with, so speeds compare.
    ref_lat = stored.meta["performance"]["latency"]
    perf = run_probe(
        fmt.RUNTIME,
        artifact,
        threads,
        ref_lat["prompt_tokens"],
        ref_lat["decode_tokens"],
        cfg.repeats,
        sustained_s=cfg.sustained_s,
    )
    step()
    info = fmt.describe(artifact)
    return {
        "artifact": {
            "path": str(artifact),
            "format": fmt.NAME,
            "runtime": fmt.RUNTIME,
            "file_type": info["file_type"],
            "size_bytes": info["size_bytes"],
            "sha256": content_hash(artifact),
            "tensor_types": info["tensor_types"],
        },
        "fidelity": fidelity,
        "answers": _answers(examples, replies, [g.stopped for g in outs]),
        "performance": perf,
        # The bandwidth side of the roofline is measured once per report (see pipeline.finish_report).
        "roofline": {"bytes_per_token": info["bytes_per_token"]},
        "machine": _machine(),
    }


def bench(
    artifact: Path, ref_dir: Path, out_dir: Path, cfg: BenchConfig, progress: Progress = _no_progress
) -> StageOutput:
    """Cached stage: ``out_dir/manifest.json`` results hold the artifact's measurements."""
    inputs = {"artifact": content_hash(artifact), "reference": content_hash(ref_dir)}
    params = _bench_params(cfg)
    return run_stage(out_dir, "bench", inputs, params, lambda tmp: measure_artifact(artifact, ref_dir, cfg, progress))


# --------------------------------------------------------------------------------------------
# base model row (torch)


def _torch_row(rt: Any, ref_dir: Path, cfg: BenchConfig, progress: Progress, label: str) -> dict[str, Any]:
    """A torch model's ladder figures against the stored reference: fidelity and task accuracy."""
    stored = stored_reference.load(ref_dir)
    fidelity = compare_stored(stored, rt, progress(f"{label}: logits", len(stored.tokens)))
    step = progress(f"{label}: answers to held-out questions", 1)
    replies = rt.generate_batch([ex.prompt for ex in stored.examples], cfg.max_new_tokens)
    step()
    rt.close()
    fidelity["task_accuracy_artifact"] = task_accuracy(replies, stored.examples)
    return {"fidelity": fidelity, "answers": _answers(stored.examples, replies)}


def bench_base(
    base_dir: Path,
    ref_dir: Path,
    out_dir: Path,
    cfg: BenchConfig,
    progress: Progress = _no_progress,
    dtype: ReferenceDtype = FP32,
) -> StageOutput:
    """The base model's ladder row, in the reference's dtype (one whole-model torch copy, like it)."""
    inputs = {"base": content_hash(base_dir), "reference": content_hash(ref_dir)}

    def work(tmp: Path) -> dict[str, Any]:
        rt = TorchRuntime(base_dir, threads=_threads(cfg), dtype=dtype.name)
        return {**_torch_row(rt, ref_dir, cfg, progress, "base"), "dtype": dtype.name}

    return run_stage(out_dir, "bench-base", inputs, _torch_params(_bench_params(cfg), dtype), work)


def bench_adapter_nf4(
    base_dir: Path,
    adapter_dir: Path,
    ref_dir: Path,
    out_dir: Path,
    cfg: BenchConfig,
    progress: Progress = _no_progress,
) -> StageOutput:
    """A QLoRA build's "adapter on NF4 base" row (torch): the model the adapter was trained as, before
    any merge, against the fine-tuned fp32 reference on the same held-out sequences."""
    inputs = {"base": content_hash(base_dir), "adapter": content_hash(adapter_dir), "reference": content_hash(ref_dir)}

    def work(tmp: Path) -> dict[str, Any]:
        import torch

        _, dtype = trained_on(adapter_dir)
        threads = _threads(cfg)
        torch.set_num_threads(threads)
        model = adapter_on_nf4(base_dir, adapter_dir, dtype, "cuda:0" if torch.cuda.is_available() else "cpu")
        rt = TorchRuntime(adapter_dir, threads=threads, model=model)
        return {**_torch_row(rt, ref_dir, cfg, progress, "adapter on NF4 base"), "compute_dtype": dtype}

    return run_stage(out_dir, "bench-adapter-nf4", inputs, _bench_params(cfg), work)


def reference_row(ref_dir: Path) -> dict[str, Any]:
    """The reference's own ladder row, from the stored figures (KLD 0 by definition)."""
    meta = stored_reference.load(ref_dir).meta
    return {
        "kl_divergence_mean": 0.0,
        "kl_divergence_p99": 0.0,
        "top1_agreement": 1.0,
        "perplexity_artifact": meta["perplexity"],
        "perplexity_artifact_err": meta["perplexity_err"],
        "perplexity_delta_pct": 0.0,
        "task_accuracy_artifact": meta["task_accuracy"],
    }
