"""Stage `train`: a LoRA (or QLoRA) adapter from a base model folder and a chat dataset.

Reads top to bottom: validate → tokenise with the model's chat template (loss on assistant tokens
only) → set up the peft model → transformers ``Trainer`` → save a standard peft adapter folder.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .data import Example, load_jsonl
from .errors import ConfigError
from .loading import loading
from .stage import StageOutput, content_hash, run_stage

IGNORE_INDEX = -100  # label value the loss skips (transformers convention)


def tokenize_example(tokenizer: Any, ex: Example, max_len: int) -> dict[str, list[int]]:
    """Token ids of the whole conversation and labels that keep only the assistant replies.

    Each assistant turn's tokens are found by rendering the conversation up to that turn with and
    without it: the chat template renders prefixes identically, so the difference is exactly the
    reply (its end-of-turn token included, which is what teaches the model to stop).
    """
    ids = tokenizer.apply_chat_template(ex.messages, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(ex.messages):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tokenizer.apply_chat_template(ex.messages[:i], add_generation_prompt=True, tokenize=True)))
        end = len(_ids(tokenizer.apply_chat_template(ex.messages[: i + 1], tokenize=True)))
        labels[start:end] = ids[start:end]
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


class _PadCollator:
    """Right-pads a batch; padded positions get label IGNORE_INDEX and attention 0."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for b in batch:
            pad = n - len(b["input_ids"])
            out["input_ids"].append(b["input_ids"] + [self.pad_id] * pad)
            out["labels"].append(b["labels"] + [IGNORE_INDEX] * pad)
            out["attention_mask"].append([1] * len(b["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v) for k, v in out.items()}


def _load_base(model_dir: Path, cfg: TrainConfig) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.method == "lora":
        with loading(model_dir, "the base model"):
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("[train].method = 'qlora' needs bitsandbytes: pip install bitsandbytes") from None
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    with loading(model_dir, "the base model in 4-bit"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=compute)
    return prepare_model_for_kbit_training(model)


def use_bf16(precision: str) -> bool:
    """Whether to train with bf16 autocast: asked for, or `auto` on hardware with native bf16.

    On a CPU with AVX512-BF16/AMX, bf16 autocast measured 1.45x faster per LoRA step on SmolLM2;
    on one without, bf16 is emulated and slower, so `auto` keeps fp32 there.
    """
    import torch

    if precision != "auto":
        return precision == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def train_adapter(model_dir: Path, train_file: Path, out_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tune and write the adapter into ``out_dir`` (which must exist). Returns training stats."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed

    examples = load_jsonl(train_file)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    with loading(model_dir, "the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        raise ConfigError(f"{model_dir}: the tokenizer has no chat template; chat datasets need one")
    rows = [tokenize_example(tokenizer, ex, cfg.max_seq_len) for ex in examples]
    rows = [r for r in rows if any(lbl != IGNORE_INDEX for lbl in r["labels"])]
    if not rows:
        raise ConfigError(f"[train].max_seq_len = {cfg.max_seq_len} truncates every assistant reply away")

    model = _load_base(model_dir, cfg)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    use_cuda = torch.cuda.is_available()
    bf16 = use_bf16(cfg.precision)
    args = TrainingArguments(
        output_dir=str(out_dir / "_trainer"),
        per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=max(0, math.ceil(cfg.warmup_ratio * _total_steps(len(rows), cfg))),
        logging_steps=max(1, len(rows) // cfg.batch_size // 2),
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not use_cuda,
        bf16=bf16,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=_PadCollator(tokenizer.pad_token_id or 0),
    )
    result = trainer.train()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "examples": len(rows),
        "steps": trainer.state.global_step,
        "train_loss": round(result.training_loss, 4),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "device": "cuda" if use_cuda else "cpu",
        "precision": "bf16 autocast" if bf16 else "fp32",
    }


def _total_steps(n_rows: int, cfg: TrainConfig) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return math.ceil(n_rows / cfg.batch_size) * math.ceil(cfg.epochs)


def check_target_modules(architecture: str, modules: list[str]) -> None:
    """Every ``[train].target_modules`` entry must name a module the architecture has.

    peft matches a name against the end of each module's dotted path; one that matches nothing
    would otherwise fail (or, mixed with valid names, silently adapt less) after the model loaded.
    """
    from .models import adaptable_modules

    known = adaptable_modules(architecture)
    for m in modules:
        if m.rsplit(".", 1)[-1] not in known:
            raise ConfigError(
                f"[train].target_modules: {m!r} matches no module of {architecture}; expected names from: {', '.join(known)}"
            )


def train(model_dir: Path, train_file: Path, out_dir: Path, cfg: TrainConfig) -> StageOutput:
    """The cached stage: re-trains only when the base, the data or the parameters changed."""
    from dataclasses import asdict

    from .models import architecture_of, check_model_dir

    check_target_modules(architecture_of(check_model_dir(model_dir)), cfg.target_modules)
    inputs = {"model": content_hash(model_dir), "train_data": content_hash(train_file)}
    params = {k: v for k, v in asdict(cfg).items() if k != "threads"}  # threads do not change results

    def work(tmp: Path) -> dict[str, Any]:
        stats = train_adapter(model_dir, train_file, tmp, cfg)
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)  # Trainer scratch, not part of the adapter
        return stats

    return run_stage(out_dir, "train", inputs, params, work)
