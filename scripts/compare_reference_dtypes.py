"""How far a bf16 reference is from the fp32 one, on a model where both fit: what a build that falls
back to bf16 (its fp32 copy would not fit; see edgeft.resources.reference_dtype) gives up.

    nice -n 19 .venv/bin/python scripts/compare_reference_dtypes.py smollm2-135m examples/cooking/eval.jsonl \\
        --out out/ref-dtypes --threads 2 --prompt-tokens 128 --decode-tokens 32 --repeats 2

Runs edgeft's own reference stage twice into ``--out`` (fp32, then bf16; cached there, so a second
run only compares), then scores the bf16 model against the stored fp32 reference exactly as an
artifact is scored: mean and p99 KL divergence over the reference's top-k + tail, top-1 agreement,
both with their 95% bootstrap intervals, on the held-out replies. Also each reference's task
accuracy, the questions whose answers changed, and each one's speed and peak RSS (probe processes;
short lengths by default: on a loaded machine at nice 19 the build's 512 + 128 tokens × 6 runs took
more than the probe's 15 minutes). With ``--artifact`` (a .gguf file or an ONNX folder, repeatable),
each artifact is also scored against both references: how much a bf16 reference moves the figures
a report gives. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeft.bench import reference as stored_reference
from edgeft.bench.fidelity import compare_stored
from edgeft.bench.run import reference
from edgeft.config import BenchConfig
from edgeft.machine import describe, summary
from edgeft.models import resolve_model
from edgeft.report import paired_task
from edgeft.resources import ReferenceDtype
from edgeft.runtimes.torch import TorchRuntime


def _against_both(artifact: Path, refs: dict[str, Path], threads: int) -> dict:
    """An artifact's mean KLD and top-1 against the fp32 and against the bf16 stored reference."""
    from edgeft.formats import detect_artifact
    from edgeft.runtimes import load_runtime

    fmt, path = detect_artifact(artifact)
    rt = load_runtime(fmt.RUNTIME, path, threads=threads or 1, scoring=True)
    out = {}
    for short, ref in refs.items():
        f = compare_stored(stored_reference.load(ref), rt)
        out[short] = {k: f[k] for k in ("kl_divergence_mean", "kl_divergence_interval", "top1_agreement")}
    rt.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a built-in name or an fp32 HF folder")
    parser.add_argument("eval_file", type=Path, help="held-out chat JSONL with answers")
    parser.add_argument("--out", type=Path, default=Path("out/ref-dtypes"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--artifact", type=Path, action="append", default=[], help="also score this against both")
    a = parser.parse_args()

    model = resolve_model(a.model)
    cfg = BenchConfig(
        threads=a.threads,
        top_k=a.top_k,
        max_new_tokens=a.max_new_tokens,
        prompt_tokens=a.prompt_tokens,
        decode_tokens=a.decode_tokens,
        repeats=a.repeats,
    )
    bf16 = ReferenceDtype("bfloat16", "scripts/compare_reference_dtypes.py")
    refs = {
        d.short: reference(model, a.eval_file, a.out / d.short, cfg, dtype=d).path for d in (ReferenceDtype(), bf16)
    }
    fp32 = stored_reference.load(refs["fp32"])
    half = stored_reference.load(refs["bf16"]).meta
    rt = TorchRuntime(model, threads=a.threads, dtype="bfloat16")
    fid = compare_stored(fp32, rt)
    rt.close()
    artifacts = {str(p): _against_both(p, refs, a.threads) for p in a.artifact}
    changed = sum(x["reply"] != y["reply"] for x, y in zip(fp32.meta["answers"], half["answers"]))

    def perf(meta: dict) -> dict:
        p = meta["performance"]
        return {
            "decode_tok_s": p["latency"]["decode_tok_s"]["median"],
            "prefill_tok_s": p["latency"]["prefill_tok_s"]["median"],
            "peak_rss_mb": round(p["peak_rss_bytes"] / 1e6),
            "load_s": round(p["load_s"], 2),
        }

    print(
        json.dumps(
            {
                "model": a.model,
                "eval": str(a.eval_file),
                "machine": summary(describe()),
                "positions": fid["positions"],
                "top_k": a.top_k,
                "bf16_vs_fp32": {
                    k: fid[k]
                    for k in (
                        "kl_divergence_mean",
                        "kl_divergence_interval",
                        "kl_divergence_p99",
                        "top1_agreement",
                        "top1_agreement_interval",
                        "perplexity_reference",
                        "perplexity_artifact",
                    )
                },
                "task_accuracy": {"fp32": fp32.meta["task_accuracy"], "bf16": half["task_accuracy"]},
                "task_accuracy_paired": paired_task(fp32.meta, half["answers"]),
                "answers_changed": changed,
                "questions": len(fp32.meta["answers"]),
                "speed": {"fp32": perf(fp32.meta), "bf16": perf(half)},
                "artifacts": artifacts,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
