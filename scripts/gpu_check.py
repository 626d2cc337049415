"""Train QLoRA and bf16 LoRA on SmolLM2-135M (or ``--model``) with the cooking example and print what a GPU run is for:
tokens/s and peak GPU memory of each, the KLD of the two merge strategies of the QLoRA adapter
against the adapter on its NF4 base, and the task accuracy of every resulting model.

    scripts/gpu-check                                      # on a CUDA machine: set-up + this, < 8 min
    python scripts/gpu_check.py --device cpu --steps 10    # the same on a CPU, to check the script

A check, not a test: it prints figures and exits 0; nothing else in the project depends on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COOKING = ROOT / "examples" / "cooking"


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument(
        "--model", default="smollm2-135m", help="a built-in name (qwen2.5-coder-1.5b: the real-size check) or HF folder"
    )
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per method (cooking: ~49 an epoch)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-eval", type=int, default=0, help="held-out questions for accuracy and KLD (0: all 78)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for training (0: all cores)")
    ap.add_argument("--methods", default="qlora,lora-bf16", help="which of qlora, lora-bf16 to train")
    ap.add_argument("--out", type=Path, help="keep adapters and merged models here (default: a temp folder)")
    return ap.parse_args()


def _log(start: float, text: str) -> None:
    print(f"[{time.monotonic() - start:6.1f} s] {text}", flush=True)


def _train(method: str, precision: str, model_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    import torch

    from edgeft.config import TrainConfig
    from edgeft.train import train

    cfg = TrainConfig(
        method=method,
        device=args.device,
        precision=precision,
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_seq_len=128,
        rank=16,
        alpha=32,
        learning_rate=1e-3,
        save_steps=0,
        validation_share=0.0,  # tokens/s of training alone, on every training row, as measured before
        seed=0,
        threads=args.threads,
    )
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    stage = train(model_dir, COOKING / "train.jsonl", out, cfg)
    results = dict(stage.manifest["results"])
    if args.device == "cuda":
        results["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return results


def _accuracy(model_dir: Path, eval_file: Path) -> float:
    from edgeft.bench.fidelity import task_accuracy
    from edgeft.data import load_jsonl
    from edgeft.runtimes.torch import TorchRuntime

    examples = load_jsonl(eval_file, need_answers=True)
    rt = TorchRuntime(model_dir)
    replies = rt.generate_batch([ex.prompt for ex in examples], 40)
    rt.close()
    return task_accuracy(replies, examples)


def main() -> int:
    args = _args()
    start = time.monotonic()
    import torch

    from edgeft.merge import compare_merges, merge
    from edgeft.models import resolve_model

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch; run with --device cpu to check the script", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    _log(start, f"torch {torch.__version__}, device {args.device}{f' ({gpu})' if gpu else ''}")
    work = args.out or Path(tempfile.mkdtemp(prefix="edgeft-gpu-check-"))
    eval_file = COOKING / "eval.jsonl"
    if args.max_eval:
        eval_file = work / "eval.jsonl"
        work.mkdir(parents=True, exist_ok=True)
        eval_file.write_text("".join((COOKING / "eval.jsonl").read_text().splitlines(keepends=True)[: args.max_eval]))
    base = resolve_model(args.model)
    _log(start, f"model: {base}")

    runs = {}
    chosen = args.methods.split(",")
    for name, method, precision in (("qlora", "qlora", "bf16"), ("lora-bf16", "lora", "bf16")):
        if name not in chosen:
            continue
        runs[name] = _train(method, precision, base, work / f"adapter-{name}", args)
        r = runs[name]
        _log(
            start,
            f"{name}: {r['steps']} steps in {r['train_seconds']:.1f} s, {r['tokens_per_s']:.0f} tokens/s, "
            f"peak GPU memory {r.get('peak_gpu_memory_mb', 'n/a')} MB, logged loss {r['first_logged_loss']} -> "
            f"{r['last_logged_loss']} (mean {r['train_loss']}), compute {r['compute_dtype']}",
        )

    if "qlora" not in runs:
        print(json.dumps({"train": runs}, indent=2))
        return 0
    merged = {s: work / f"merged-qlora-{s}" for s in ("fp", "dequant")}
    for strategy, folder in merged.items():  # each merge streamed to disk, then measured one at a time
        merge(base, work / "adapter-qlora", folder, strategy)
    kld, sequences = compare_merges(base, work / "adapter-qlora", eval_file, merged)
    _log(
        start,
        "qlora merges, mean KLD vs the adapter on the NF4 base "
        f"({sum(map(len, sequences))} tokens of {len(sequences)} held-out conversations): "
        + ", ".join(f"{k} {v:.3g}" for k, v in kld.items()),
    )
    if "lora-bf16" in runs:
        merge(base, work / "adapter-lora-bf16", work / "merged-lora-bf16", "fp")

    accuracy = {"base": _accuracy(base, eval_file)}
    for name in ("qlora-fp", "qlora-dequant", "lora-bf16"):
        if (work / f"merged-{name}").is_dir():
            accuracy[name] = _accuracy(work / f"merged-{name}", eval_file)
    _log(start, "task accuracy (held-out cooking questions): " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))

    summary = {
        "device": args.device,
        "model": args.model,
        "gpu": gpu,
        "torch": torch.__version__,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train": {
            k: {
                f: v.get(f)
                for f in ("tokens_per_s", "train_seconds", "peak_gpu_memory_mb", "compute_dtype", "base_dtype")
            }
            for k, v in runs.items()
        },
        "qlora_merge_kld": kld,
        "task_accuracy": accuracy,
        "seconds": round(time.monotonic() - start, 1),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
