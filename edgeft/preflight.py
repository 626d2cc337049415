"""Check every input of a command before any stage runs, so a build that must fail fails at once.

The config's own values are checked when it is read (:mod:`edgeft.config`); what needs more than
one value or a look at the inputs is checked here: the model folder (config, safetensors headers,
NaN/Inf), the datasets (the validation set apart from the eval file), adapter ↔ base shapes, ``[train].target_modules`` against the architecture,
``[bench]`` lengths against the model's context, the targets' formats, and output paths that would
destroy something edgeft did not write. Nothing here imports torch (except to ask it for a GPU that
``[train].device = 'cuda'`` requires); nothing here writes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .adapters import check_adapter, read_adapter_config
from .bench import reference as stored_reference
from .config import BenchConfig, BuildConfig
from .data import load_jsonl
from .errors import ConfigError, ModelError
from .merge import check_strategy
from .models import BUILTIN_MODELS, check_model_dir, model_facts, resolve_model
from .resources import check_fits, plan
from .stage import check_output_dir, check_replaceable
from .targets import Target
from .train import check_target_modules, resolve_device
from .validation import split_validation


def _in_config(where: str, check, *args: Any) -> None:
    """Run ``check``; its ConfigError names the config file it came from."""
    try:
        check(*args)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_model(name: str) -> tuple[str, dict[str, Any] | None]:
    """(architecture, config or None for a not-yet-materialised built-in); local weights scanned."""
    if name not in BUILTIN_MODELS:
        resolve_model(name)  # config, safetensors headers, NaN/Inf scan
    return model_facts(name)


def check_bench_fits(bench: BenchConfig, model_config: dict[str, Any] | None, where: str) -> None:
    """The benchmark's token budgets fit the model's context and vocabulary."""
    if model_config is None:
        return
    context = model_config.get("max_position_embeddings")
    need = bench.prompt_tokens + bench.decode_tokens
    if isinstance(context, int) and need > context:
        raise ConfigError(
            f"{where}: [bench] prompt_tokens + decode_tokens = {need} exceeds the model's context of {context} tokens"
        )
    if bench.top_k > model_config["vocab_size"]:
        raise ConfigError(
            f"{where}: [bench].top_k = {bench.top_k} exceeds the model's vocabulary of {model_config['vocab_size']}"
        )


def check_training(cfg: BuildConfig, where: str) -> None:
    """What training needs beyond its own values: a GPU when one is asked for, bitsandbytes for QLoRA.

    torch is imported only when ``[train].device = 'cuda'`` (to ask it for a GPU).
    """
    if cfg.train.device == "cuda":
        _in_config(where, resolve_device, "cuda")
    if cfg.train.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{where}: [train].method = 'qlora' needs bitsandbytes: pip install 'edgeft[train]'")
    if cfg.train.method == "lora" and cfg.merge.strategy == "dequant":
        raise ConfigError(
            f"{where}: [merge].strategy = 'dequant' needs [train].method = 'qlora'; a 'lora' adapter is trained "
            "on the full-precision base, so only 'fp' (or 'auto', which means 'fp' for it) applies"
        )


def check_validation(cfg: BuildConfig, where: str, train_file: Path, validation: Path | None) -> None:
    """The validation set picks the kept checkpoint: one must exist where ``[train].eval_steps`` asks for
    it, it must not be the training data, and never the ``[data].eval`` file (that would leak the task
    measurement into training). Datasets are read (no torch)."""
    t = cfg.train
    if validation is None:
        if t.validation_share == 0 and t.eval_steps > 0:
            raise ConfigError(
                f"{where}: [train].eval_steps = {t.eval_steps} needs a validation set: give [data].validation "
                "or set [train].validation_share > 0"
            )
        if t.validation_share > 0:
            _in_config(where, split_validation, load_jsonl(train_file), t.validation_share, t.seed)
        return
    for name, other in (("[data].eval", cfg.data.eval), ("[data].train", train_file)):
        if other is not None and _same_bytes(validation, other):
            why = (
                "choosing a checkpoint on it would leak the task measurement into training"
                if name == "[data].eval"
                else "validation loss must come from conversations training does not see"
            )
            raise ConfigError(
                f"{where}: [data].validation {validation} is the {name} file: {why}; give another file, or leave it "
                "unset to hold out [train].validation_share of the training data"
            )
    load_jsonl(validation)


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return Path(a).read_bytes() == Path(b).read_bytes()
    except OSError:  # a missing or unreadable file is reported by the dataset check, naming it
        return False


def check_build(cfg: BuildConfig, targets: list[Target], out_dir: Path):
    """Everything `edgeft build` will read or write, in well under a second for a built-in model; and
    whether its stages fit this machine's RAM and disk (the :class:`~edgeft.resources.ResourcePlan`
    it returns), refused before training starts when they do not."""
    where = str(cfg.source or "config")
    check_output_dir(out_dir)
    if cfg.data.train is None:
        raise ConfigError(f"{where}: [data].train: a training dataset is required")
    if cfg.data.eval is None:
        raise ConfigError(f"{where}: [data].eval: a held-out dataset is required for bench")
    arch, model_config = check_model(cfg.model)
    _in_config(where, check_target_modules, arch, cfg.train.target_modules)
    check_training(cfg, where)
    check_bench_fits(cfg.bench, model_config, where)
    load_jsonl(cfg.data.train)
    load_jsonl(cfg.data.eval, need_answers=True)
    check_validation(cfg, where, cfg.data.train, cfg.data.validation)
    resources = plan(cfg, targets, out_dir)
    check_fits(resources, where)
    return resources


def check_train(cfg: BuildConfig, data: Path, out_dir: Path) -> None:
    where = str(cfg.source or "config")
    check_output_dir(out_dir)
    check_replaceable(out_dir)  # the adapter folder is replaced as a whole
    arch, _ = check_model(cfg.model)
    _in_config(where, check_target_modules, arch, cfg.train.target_modules)
    check_training(cfg, where)
    load_jsonl(data)
    check_validation(cfg, where, data, cfg.data.validation)


def check_merge(model: str, adapter: Path, out_dir: Path, strategy: str = "fp", eval_file: Path | None = None) -> str:
    """Adapter folder and output first; shapes against the base once its config is known.

    Returns the strategy that will run (``auto`` of a LoRA adapter is ``fp``)."""
    check_output_dir(out_dir)
    check_replaceable(out_dir)  # the merged folder is replaced as a whole
    read_adapter_config(adapter)
    strategy = check_strategy(strategy, adapter, eval_file, "--strategy")
    if strategy == "auto":
        load_jsonl(eval_file)
    arch, config = check_model(model)
    if config is not None:
        check_adapter(adapter, config, arch)  # a built-in base is checked after it materialises
    return strategy


def check_reference(path: Path) -> bool:
    """True for a stored reference folder (fully readable), False for an HF model folder."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"--reference {path}: no such folder")
    if not path.is_dir():
        raise ModelError(f"--reference {path}: expected a reference folder or an HF model folder, found a file")
    if stored_reference.is_stored_reference(path):
        stored_reference.load(path)
        return True
    if (path / stored_reference.ARRAYS).exists() or (path / stored_reference.META).exists():
        stored_reference.load(path)  # half a reference: raises naming what is missing

    if not (path / "config.json").is_file():
        raise ModelError(
            f"--reference {path}: neither a stored reference ({stored_reference.ARRAYS} + {stored_reference.META}) "
            "nor a Hugging Face model folder (config.json)"
        )
    check_model_dir(path)
    return False
