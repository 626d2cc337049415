"""`edgeft train` against a plain peft + transformers ``Trainer`` script: training step time, interleaved.

    python scripts/bench_train.py --steps 12 --rounds 3           # the cooking example, SmolLM2-135M

Both train the same LoRA on the same model with the same rows (the cooking train set, tokenized once
with the chat template, loss on assistant tokens), batch size, learning-rate schedule, precision
(bf16 autocast where the CPU has native bf16, as ``precision = "auto"``) and threads. Each round runs
edgeft then the plain script (alternating which goes first), each from a fresh model load; a step's
time is the TrainerCallback ``on_step_begin`` → ``on_step_end`` interval (forward, backward, optimizer
step), the first step of every run dropped as warm-up. Prints median [min–max] per variant and the
ratio of medians. A benchmark, not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COOKING = ROOT / "examples" / "cooking"


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=COOKING / "edgeft.toml")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each variant, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args()


def _timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def run_edgeft(model_dir: Path, train_file: Path, cfg) -> list[float]:
    from edgeft.train import train_adapter

    timer = _timer()
    with tempfile.TemporaryDirectory() as tmp:
        train_adapter(model_dir, train_file, Path(tmp), cfg, callbacks=[timer])
    return timer.times[1:]


def run_plain(model_dir: Path, train_file: Path, cfg) -> list[float]:
    """What a user would write with peft and transformers alone (the rows are the same as edgeft's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from edgeft.data import load_jsonl
    from edgeft.train import tokenize_example, use_bf16

    torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [tokenize_example(tokenizer, ex, cfg.max_seq_len) for ex in load_jsonl(train_file)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    timer = _timer()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=cfg.batch_size,
            max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
            logging_steps=max(1, len(rows) // cfg.batch_size // 2),
            save_strategy="no",
            report_to=[],
            seed=cfg.seed,
            data_seed=cfg.seed,
            use_cpu=True,
            bf16=use_bf16(cfg.precision, "cpu"),
            remove_unused_columns=False,
        )
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[timer]).train()
    return timer.times[1:]


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} s [{min(xs):.3f}–{max(xs):.3f}]"


def main() -> int:
    args = _args()
    import torch

    from edgeft.config import load_config
    from edgeft.machine import describe
    from edgeft.models import resolve_model

    build = load_config(args.config)
    # No validation: the plain script trains on every row and never evaluates; step times must compare.
    cfg = dataclasses.replace(
        build.train,
        max_steps=args.steps,
        threads=args.threads,
        save_steps=0,
        device="cpu",
        validation_share=0.0,
        eval_steps=0,
    )
    model_dir = resolve_model(build.model)
    machine = describe()
    print(
        f"{machine.get('cpu_model')}, {args.threads} threads, torch {torch.__version__}; {build.model}, "
        f"{cfg.method} r={cfg.rank}, batch {cfg.batch_size}, max_seq_len {cfg.max_seq_len}, precision {cfg.precision}, "
        f"{args.steps} steps x {args.rounds} rounds each (first step of each run dropped)",
        flush=True,
    )
    times: dict[str, list[float]] = {"edgeft": [], "plain": []}
    runners = {"edgeft": run_edgeft, "plain": run_plain}
    for r in range(args.rounds):
        order = ("edgeft", "plain") if r % 2 == 0 else ("plain", "edgeft")
        for name in order:
            t = runners[name](model_dir, build.data.train, cfg)
            times[name] += t
            print(f"round {r + 1} {name:6s}: step {_spread(t)}", flush=True)
    ratio = statistics.median(times["edgeft"]) / statistics.median(times["plain"])
    for name, t in times.items():
        print(f"{name:6s}: step {_spread(t)} over {len(t)} steps")
    print(f"edgeft / plain (medians): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
