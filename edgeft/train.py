"""Stage `train`: a LoRA (or QLoRA) adapter from a base model folder and a chat dataset.

Reads top to bottom: validate → tokenise with the model's chat template (loss on assistant tokens
only) → set up the peft model → transformers ``Trainer`` → save a standard peft adapter folder.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import checkpoints as ckpt
from .config import TrainConfig
from .data import IGNORE_INDEX, Example, load_jsonl, tokenize_example
from .errors import ConfigError
from .loading import loading
from .models import adaptable_modules, architecture_of, check_model_dir
from .nf4 import load_nf4
from .stage import StageOutput, cached, content_hash, read_manifest, run_stage, stage_key
from .validation import best_of, eval_every, history, make_keep_best, split_validation

LOSS_POINTS = 50  # train-loss log entries per run, about


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


def resolve_device(requested: str) -> str:
    """``cpu`` or ``cuda`` for ``[train].device``; CUDA asked for where torch sees no GPU is a ConfigError."""
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
        raise ConfigError(
            f"[train].device = 'cuda': no GPU available ({why}, torch {torch.__version__}); use 'cpu' or 'auto'"
        )
    return "cpu"


def distributed() -> tuple[int, int]:
    """(rank, world size) of a run launched by torchrun or accelerate; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def compute_dtype(cfg: TrainConfig, device: str) -> str:
    """The dtype layers compute in: for QLoRA on a GPU bf16 where it has it (QLoRA's usual setting) unless
    ``precision = 'fp32'``; otherwise per ``precision``."""
    import torch

    if device == "cuda" and cfg.method == "qlora" and cfg.precision != "fp32":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if use_bf16(cfg.precision, device) else "float32"


def _load_base(model_dir: Path, cfg: TrainConfig, device: str, dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.method == "lora":
        # On a GPU computing in bf16 the frozen base is held in bf16 too: half the memory of fp32 (a 3B
        # model in 6 GB, not 12), and autocast would round its weights to bf16 anyway. peft keeps the
        # adapter's own weights fp32. On a CPU the base stays fp32: bf16 there is autocast only.
        base_dtype = torch.bfloat16 if device == "cuda" and dtype == "bfloat16" else torch.float32
        with loading(model_dir, "the base model"):
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=base_dtype)
    from peft import prepare_model_for_kbit_training

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    model = load_nf4(model_dir, dtype, f"cuda:{rank}" if device == "cuda" else "cpu")
    # Non-reentrant checkpointing: the reentrant kind breaks DDP's gradient hooks.
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )


def use_bf16(precision: str, device: str | None = None) -> bool:
    """Whether to train with bf16 autocast: asked for, or `auto` on hardware with native bf16.

    On a CPU with AVX512-BF16/AMX, bf16 autocast measured 1.45x faster per LoRA step on SmolLM2;
    on one without, bf16 is emulated and slower, so `auto` keeps fp32 there.
    """
    import torch

    if precision != "auto":
        return precision == "bf16"
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def train_adapter(
    model_dir: Path,
    train_file: Path,
    out_dir: Path | None,
    cfg: TrainConfig,
    *,
    checkpoints: Path | None = None,
    callbacks: list[Any] | tuple[Any, ...] = (),
    validation_file: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune and write the adapter into ``out_dir`` (which must exist). Returns training stats.

    With ``checkpoints``, Trainer saves a checkpoint there every ``cfg.save_steps`` steps and the run
    resumes from the latest complete one found there. ``out_dir`` None trains without writing the
    adapter (the other ranks of a distributed run). ``callbacks`` are transformers ``TrainerCallback``s.
    Validation loss is measured on ``validation_file``, else on ``cfg.validation_share`` of the training
    conversations, and the adapter with the lowest one is written (see :mod:`edgeft.validation`).
    """
    import torch
    from transformers import set_seed

    device = resolve_device(cfg.device)
    _, world = distributed()
    if cfg.batch_size % world:
        raise ConfigError(f"[train].batch_size = {cfg.batch_size}: expected a multiple of the {world} processes")
    examples, validation = _examples(train_file, validation_file, cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    tokenizer, rows, val_rows = _tokenized(model_dir, examples, validation, cfg.max_seq_len)
    total = _total_steps(len(rows), cfg)
    every = eval_every(cfg.eval_steps, total) if val_rows else None

    dtype = compute_dtype(cfg, device)
    model = _peft_model(model_dir, cfg, device, dtype)
    bf16 = dtype == "bfloat16"
    save = checkpoints is not None and cfg.save_steps > 0
    scratch = checkpoints if checkpoints is not None else (out_dir or Path(".")) / "_trainer"
    args = _training_args(cfg, scratch, total, every, save, world, device, bf16)
    keep_best = make_keep_best(model, checkpoints if save else None) if every else None
    callbacks = [*([keep_best] if keep_best else []), *callbacks]
    trainer = _trainer(model, args, rows, val_rows, tokenizer.pad_token_id or 0, callbacks)
    resume = ckpt.latest(checkpoints) if save else None
    tokens_before = ckpt.tokens_seen(resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if keep_best is not None and keep_best.step != trainer.state.global_step:
        _restore(model, keep_best.weights)
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return {
        **_validation_stats(trainer.state, every, validation_file, len(val_rows)),
        **_run_stats(trainer, result, model, cfg, len(rows), resume, tokens_before),
        "device": device,
        "world_size": args.world_size,
        "compute_dtype": dtype,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "base_dtype": "nf4" if cfg.method == "qlora" else str(model.get_base_model().dtype).removeprefix("torch."),
    }


def _examples(train_file: Path, validation_file: Path | None, cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(training, validation) conversations: the validation file's, else ``cfg.validation_share`` of
    the training file's, else none."""
    examples = load_jsonl(train_file)
    validation: list[Example] = []
    if validation_file is not None:
        validation = load_jsonl(validation_file)
    elif cfg.validation_share > 0:
        examples, validation = split_validation(examples, cfg.validation_share, cfg.seed)
    return examples, validation


def _peft_model(model_dir: Path, cfg: TrainConfig, device: str, dtype: str) -> Any:
    from peft import LoraConfig, get_peft_model

    model = _load_base(model_dir, cfg, device, dtype)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _trainer(model: Any, args: Any, rows: list[Any], val_rows: list[Any], pad_id: int, callbacks: list[Any]) -> Any:
    from transformers import Trainer

    return Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        eval_dataset=val_rows or None,
        data_collator=_PadCollator(pad_id),
        callbacks=callbacks,
    )


def _restore(model: Any, weights: Any) -> None:
    """The kept (lowest validation loss) adapter weights back into ``model``."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, weights)


def _tokenized(
    model_dir: Path, examples: list[Example], validation: list[Example], max_len: int
) -> tuple[Any, list[dict[str, list[int]]], list[dict[str, list[int]]]]:
    """The model's tokenizer and the training and validation rows, refused when the chat template is
    missing or ``max_len`` leaves no assistant reply to learn from."""
    from transformers import AutoTokenizer

    with loading(model_dir, "the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        raise ConfigError(f"{model_dir}: the tokenizer has no chat template; chat datasets need one")
    rows = _rows(tokenizer, examples, max_len)
    val_rows = _rows(tokenizer, validation, max_len) if validation else []
    if not rows or (validation and not val_rows):
        which = "validation" if rows else "training"
        raise ConfigError(f"[train].max_seq_len = {max_len} truncates every {which} assistant reply away")
    return tokenizer, rows, val_rows


def _training_args(
    cfg: TrainConfig, scratch: Path, total: int, every: int | None, save: bool, world: int, device: str, bf16: bool
) -> Any:
    """transformers' TrainingArguments for this run: ``total`` optimizer steps, evaluation every
    ``every`` steps (None: no validation), checkpoints in ``scratch`` when ``save``."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(scratch),
        per_device_train_batch_size=cfg.batch_size // world,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=max(0, math.ceil(cfg.warmup_ratio * total)),
        logging_steps=max(1, total // LOSS_POINTS),  # the train-loss curve: a few dozen points
        save_strategy="steps" if save else "no",
        save_steps=max(1, cfg.save_steps),
        save_total_limit=1,  # the newest complete checkpoint; an older one goes only after it is written
        eval_strategy="steps" if every else "no",
        eval_steps=every,
        per_device_eval_batch_size=cfg.batch_size // world,
        prediction_loss_only=True,  # the loss only: gathering vocabulary-wide logits would cost memory for nothing
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device == "cpu",
        bf16=bf16,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",  # for tokens/s
    )


def _run_stats(
    trainer: Any, result: Any, model: Any, cfg: TrainConfig, examples: int, resume: Path | None, tokens_before: int
) -> dict[str, Any]:
    """What the run did: steps, losses, trainable parameters and its speed (all processes)."""
    seconds = result.metrics["train_runtime"]
    tokens = trainer.state.num_input_tokens_seen - tokens_before
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "method": cfg.method,
        "examples": examples,
        "steps": trainer.state.global_step,
        "resumed_from_step": ckpt.step_of(resume),
        "train_loss": round(result.training_loss, 4),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,  # this run's, all processes
    }


def _rows(tokenizer: Any, examples: list[Example], max_len: int) -> list[dict[str, list[int]]]:
    """Tokenised conversations that keep at least one assistant token after truncation."""
    rows = [tokenize_example(tokenizer, ex, max_len) for ex in examples]
    return [r for r in rows if any(lbl != IGNORE_INDEX for lbl in r["labels"])]


def _validation_stats(state: Any, every: int | None, validation_file: Path | None, n_val: int) -> dict[str, Any]:
    """Loss histories and the kept adapter's step, for the manifest and the report's loss curve."""
    evals = history(state.log_history, "eval_loss")
    best = best_of(evals)
    return {
        "validation": None
        if every is None
        else {
            "source": str(validation_file) if validation_file else "held out of the training data",
            "examples": n_val,
        },
        "eval_steps": every,
        "train_loss_history": history(state.log_history, "loss"),
        "eval_loss_history": evals,
        "best_step": best["step"] if best else None,
        "best_eval_loss": best["loss"] if best else None,
        "final_is_best": None if best is None else best["step"] == state.global_step,
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
    known = adaptable_modules(architecture)
    for m in modules:
        if m.rsplit(".", 1)[-1] not in known:
            raise ConfigError(
                f"[train].target_modules: {m!r} matches no module of {architecture}; expected names from: {', '.join(known)}"
            )


def train(
    model_dir: Path,
    train_file: Path,
    out_dir: Path,
    cfg: TrainConfig,
    *,
    callbacks: list[Any] | tuple[Any, ...] = (),
    validation_file: Path | None = None,
) -> StageOutput:
    """The cached stage: re-trains only when the base, the data or the parameters changed.

    A run killed mid-way resumes from its last checkpoint when run again (see :mod:`edgeft.checkpoints`).
    Under torchrun/accelerate every rank trains and rank 0 alone writes the stage.
    """
    check_target_modules(architecture_of(check_model_dir(model_dir)), cfg.target_modules)
    inputs = {"model": content_hash(model_dir), "train_data": content_hash(train_file)}
    if validation_file is not None:  # it picks the kept checkpoint
        inputs["validation_data"] = content_hash(validation_file)
    # threads and checkpoint spacing do not change the adapter
    params = {k: v for k, v in asdict(cfg).items() if k not in ("threads", "save_steps")}
    rank, world = distributed()
    if world > 1:
        params["world_size"] = world  # another data order than a single process
    key = stage_key("train", inputs, params)
    if hit := cached(out_dir, key):
        return hit
    if rank != 0:
        folder = Path(out_dir).parent / ckpt.folder_name(Path(out_dir).name, key)
        train_adapter(
            model_dir, train_file, None, cfg, checkpoints=folder, callbacks=callbacks, validation_file=validation_file
        )
        _barrier()
        return StageOutput(Path(out_dir), False, read_manifest(out_dir) or {})

    with ckpt.resumable(out_dir, key) as folder:

        def work(tmp: Path) -> dict[str, Any]:
            stats = train_adapter(
                model_dir,
                train_file,
                tmp,
                cfg,
                checkpoints=folder,
                callbacks=callbacks,
                validation_file=validation_file,
            )
            shutil.rmtree(tmp / "_trainer", ignore_errors=True)  # Trainer scratch, not part of the adapter
            return stats

        out = run_stage(out_dir, "train", inputs, params, work)
        _barrier()  # the other ranks have written their last RNG states before the checkpoints go
    return out


def _barrier() -> None:
    """Wait for every rank of a distributed run (rank 0 writes the stage; the others return after it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
