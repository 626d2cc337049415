"""Build config (``edgeft.toml``) → validated dataclasses, with one-line errors naming the key.

The file is flat, one table per stage::

    model = "smollm2-135m"          # builtin name or a local Hugging Face folder
    [data]   train = "train.jsonl"  eval = "eval.jsonl"
    [train]  rank = 16  epochs = 3 ...
    [bench]  threads = 2 ...
    [gates]  max_kld = 0.1 ...

Relative paths are resolved against the config file's folder. CLI flags override fields of the same
object, so the file and the flags are two views of one :class:`BuildConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

import tomllib

from .errors import ConfigError

# The llama.cpp context edgeft's benchmarks run with (prompt + generated tokens must fit in it).
BENCH_CONTEXT = 2048


def _check(
    table: str, name: str, value: Any, lo: float | None = None, hi: float | None = None, *, open_lo: bool = False
) -> None:
    """Raise ConfigError unless ``value`` is a finite number in [lo, hi] (``(lo, hi]`` with open_lo)."""
    if value is None:
        return
    where = f"[{table}].{name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if lo is not None and (value <= lo if open_lo else value < lo):
        if open_lo and lo == 0 and hi is None:
            raise ConfigError(f"{where}: expected a positive number, got {value!r}")
        rng = f"> {lo:g}" if open_lo else f">= {lo:g}"
        raise ConfigError(f"{where}: expected a number {rng}{'' if hi is None else f' and <= {hi:g}'}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: expected a number <= {hi:g}, got {value!r}")


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class DataConfig:
    train: Path | None = _help("chat JSONL used for fine-tuning", None)
    eval: Path | None = _help("held-out chat JSONL with `answers` for task accuracy", None)
    validation: Path | None = _help(
        "chat JSONL whose loss picks the best training checkpoint; unset: [train].validation_share of the "
        "training conversations is held out instead. Never the `eval` file: choosing a checkpoint on it would "
        "leak the task measurement into training",
        None,
    )


DEVICES = ("auto", "cpu", "cuda")
MAX_VALIDATION_SHARE = 0.5  # holding out more than half the training data is a mistake, not a choice
MERGE_STRATEGIES = ("fp", "dequant", "auto")
REFERENCE_DTYPES = ("auto", "float32", "bfloat16")
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16"}  # how reports and messages write a torch dtype


@dataclass
class TrainConfig:
    method: str = _help(
        "`lora` (full-precision base) or `qlora` (base loaded in 4-bit NF4 with double quantization through "
        "bitsandbytes; bf16 compute on a GPU; runs on CPU too, slowly)",
        "lora",
    )
    device: str = _help("`auto` (a CUDA GPU when torch sees one, else the CPU), `cpu` or `cuda`", "auto")
    rank: int = _help("LoRA rank r; higher adapts more and trains slower", 16)
    alpha: float = _help("LoRA alpha; the update is scaled by alpha / rank", 32.0)
    dropout: float = _help("dropout on the LoRA input", 0.0)
    target_modules: list[str] = _help(
        "module names to adapt; the default is every linear layer of a decoder block",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    epochs: float = _help("passes over the training set", 3.0)
    max_steps: int = _help("stop after this many optimizer steps (-1: use epochs)", -1)
    learning_rate: float = _help("peak learning rate (linear decay, warm-up below)", 1e-3)
    warmup_ratio: float = _help("fraction of steps spent warming up", 0.05)
    batch_size: int = _help("examples per optimizer step", 8)
    max_seq_len: int = _help("longer examples are truncated to this many tokens", 256)
    seed: int = _help("seed for weights init, shuffling and dropout", 0)
    save_steps: int = _help(
        "checkpoint every N optimizer steps, so a killed run resumes there when run again (0: no checkpoints); "
        "lower loses less work, costs a write of the adapter and optimizer state each time",
        25,
    )
    validation_share: float = _help(
        "share of the training conversations held out (chosen by `seed`) to measure validation loss when "
        "[data].validation is unset (0: no validation, the last step's adapter is kept)",
        0.1,
    )
    eval_steps: int = _help(
        "measure validation loss every N optimizer steps and at the last one; the adapter with the lowest "
        "validation loss is kept (0: about ten times a run, every ceil(total steps / 10))",
        0,
    )
    threads: int = _help("torch CPU threads (0: all cores)", 0)
    precision: str = _help(
        "`auto` (bf16 mixed precision where the CPU/GPU computes bf16 natively, else fp32), `bf16` or `fp32`; "
        "the adapter and the merge stay fp32 either way",
        "auto",
    )

    def __post_init__(self) -> None:
        if self.method not in ("lora", "qlora"):
            raise ConfigError(f"[train].method: expected 'lora' or 'qlora', got {self.method!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"[train].device: expected one of {', '.join(map(repr, DEVICES))}, got {self.device!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"[train].precision: expected 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        for name in ("rank", "batch_size", "max_seq_len"):
            _check("train", name, getattr(self, name), 0, open_lo=True)
        _check("train", "learning_rate", self.learning_rate, 0, 1, open_lo=True)
        _check("train", "alpha", self.alpha, 0, open_lo=True)
        _check("train", "dropout", self.dropout, 0, 0.99)
        _check("train", "warmup_ratio", self.warmup_ratio, 0, 1)
        _check("train", "epochs", self.epochs, 0, 10_000)
        _check("train", "max_steps", self.max_steps, -1)
        _check("train", "seed", self.seed, 0, 2**32 - 1)
        _check("train", "threads", self.threads, 0, 4096)
        _check("train", "save_steps", self.save_steps, 0)
        _check("train", "validation_share", self.validation_share, 0, MAX_VALIDATION_SHARE)
        _check("train", "eval_steps", self.eval_steps, 0)
        if self.max_steps > 0 and self.eval_steps > self.max_steps:
            raise ConfigError(
                f"[train].eval_steps = {self.eval_steps} exceeds [train].max_steps = {self.max_steps}: validation "
                "loss would be measured only once, at the end; lower it (0: about ten times a run)"
            )
        if self.max_steps == 0:
            raise ConfigError("[train].max_steps: expected -1 (train for `epochs`) or a positive number, got 0")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("[train]: set epochs > 0 or max_steps > 0")
        if not self.target_modules:
            raise ConfigError("[train].target_modules: expected at least one module name")
        if any(not m.strip() for m in self.target_modules):
            raise ConfigError(
                f"[train].target_modules: expected module names, got an empty one in {self.target_modules!r}"
            )


@dataclass
class MergeConfig:
    strategy: str = _help(
        "which base a QLoRA adapter is folded into: `fp` (the original full-precision weights), `dequant` "
        "(the NF4-dequantized weights it was trained against) or `auto` (both, measured by mean KL divergence "
        "against the adapter on the 4-bit base over the held-out conversations; the closer one is kept and "
        "both figures recorded). A `lora` adapter was trained on the full-precision base: `auto` means `fp`",
        "auto",
    )

    def __post_init__(self) -> None:
        if self.strategy not in MERGE_STRATEGIES:
            raise ConfigError(
                f"[merge].strategy: expected one of {', '.join(map(repr, MERGE_STRATEGIES))}, got {self.strategy!r}"
            )


@dataclass
class BenchConfig:
    threads: int = _help("threads for every runtime, so speeds compare (0: all cores)", 0)
    max_eval: int = _help("use at most this many held-out examples (0: all)", 0)
    max_new_tokens: int = _help("generation budget per held-out question", 48)
    prompt_tokens: int = _help("prompt length for time-to-first-token and prefill speed", 512)
    decode_tokens: int = _help("tokens generated per latency repetition", 128)
    repeats: int = _help("latency repetitions after one warm-up; median and min/max are reported", 5)
    top_k: int = _help("reference log-probs kept per position; KLD uses these k tokens + the tail", 64)
    golden: int = _help("held-out questions shown side by side (reference vs artifact) as golden prompts", 3)
    ladder_export: bool = _help(
        "also measure the unquantized f32 export (separates conversion from quantization loss)", True
    )
    sustained_s: float = _help(
        "after the latency runs, decode continuously this many seconds and report the first and last 20% of the "
        "tokens apart, so throttling shows (0: off; `edgeft bench --sustained`)",
        0.0,
    )
    reference_dtype: str = _help(
        "what the torch passes (the reference and the base model's row) load the model in: `auto` (float32 when "
        "one fp32 copy fits this machine's RAM, else bfloat16; the report says which and why), `float32` or "
        "`bfloat16` (half the memory; its own rounding moves the reference a little, see docs/report.md)",
        "auto",
    )

    def __post_init__(self) -> None:
        if self.reference_dtype not in REFERENCE_DTYPES:
            raise ConfigError(
                f"[bench].reference_dtype: expected one of {', '.join(map(repr, REFERENCE_DTYPES))}, "
                f"got {self.reference_dtype!r}"
            )
        for name in ("max_new_tokens", "prompt_tokens", "decode_tokens", "repeats", "top_k"):
            _check("bench", name, getattr(self, name), 0, open_lo=True)
        for name in ("threads", "max_eval", "golden"):
            _check("bench", name, getattr(self, name), 0)
        _check("bench", "threads", self.threads, 0, 4096)
        _check("bench", "repeats", self.repeats, 1, 1000)
        _check("bench", "top_k", self.top_k, 1, 4096)
        for name in ("max_new_tokens", "prompt_tokens", "decode_tokens"):
            _check("bench", name, getattr(self, name), 1, BENCH_CONTEXT)
        _check("bench", "decode_tokens", self.decode_tokens, 2)  # the first token is timed as TTFT
        _check("bench", "sustained_s", self.sustained_s, 0, 3600)
        if self.prompt_tokens + self.decode_tokens > BENCH_CONTEXT:
            raise ConfigError(
                f"[bench]: prompt_tokens + decode_tokens = {self.prompt_tokens + self.decode_tokens} exceeds the "
                f"benchmark context of {BENCH_CONTEXT} tokens"
            )


@dataclass
class GatesConfig:
    """Quality gates; an unset gate is not checked. `edgeft build` exits 1 when one fails."""

    WHOLE_NUMBERS: ClassVar[frozenset[str]] = frozenset({"max_flips"})  # counts: `--gate` parses them as int

    max_kld: float | None = _help("max mean KL divergence of artifact vs reference", None)
    min_top1: float | None = _help("min top-1 token agreement with the reference (0-1)", None)
    max_ppl_delta_pct: float | None = _help("max perplexity increase over the reference, percent", None)
    min_task_accuracy_ratio: float | None = _help(
        "min artifact task accuracy / reference task accuracy (two noisy numbers: prefer max_task_accuracy_drop)",
        None,
    )
    max_task_accuracy_drop: float | None = _help(
        "max drop of task accuracy vs the reference (0-1), judged by the upper end of its paired 95% interval: "
        "passes only when the data rule out a larger drop, so a small eval set needs a looser limit",
        None,
    )
    max_flips: int | None = _help("max held-out questions the reference gets right and the artifact wrong", None)
    min_decode_tok_s: float | None = _help("min artifact decode tokens/s on this machine (median)", None)
    max_peak_rss_mb: float | None = _help("max peak resident memory of the artifact's runtime process, MB", None)
    max_size_mb: float | None = _help("max artifact size in MB (10^6 bytes)", None)
    golden_must_stop: bool | None = _help("every golden prompt's answer must end on a stop token", None)
    golden_must_be_correct: bool | None = _help("every golden prompt's answer must be correct", None)

    def __post_init__(self) -> None:
        _check("gates", "max_kld", self.max_kld, 0)
        _check("gates", "min_top1", self.min_top1, 0, 1)
        _check("gates", "max_ppl_delta_pct", self.max_ppl_delta_pct)
        _check("gates", "min_task_accuracy_ratio", self.min_task_accuracy_ratio, 0)
        _check("gates", "max_task_accuracy_drop", self.max_task_accuracy_drop, 0, 1)
        _check("gates", "max_flips", self.max_flips, 0)
        _check("gates", "min_decode_tok_s", self.min_decode_tok_s, 0)
        _check("gates", "max_peak_rss_mb", self.max_peak_rss_mb, 0, open_lo=True)
        _check("gates", "max_size_mb", self.max_size_mb, 0, open_lo=True)


@dataclass
class CalibrationConfig:
    """The calibration set importance matrices are measured on (targets with ``imatrix = ...``)."""

    tokens: int = _help("token budget of the calibration set", 16384)
    chunk_tokens: int = _help("tokens per calibration chunk (one forward pass each)", 512)
    task_share: float = _help("with imatrix = 'mix': the share of the budget taken from the training data", 0.5)
    sensitivity_tokens: int = _help(
        "targets with max_size_mb: tokens (whole chunks spread over the set) each sensitivity probe is scored on; "
        "more = steadier per-tensor choices, every probe slower",
        2048,
    )

    def __post_init__(self) -> None:
        _check("calibration", "tokens", self.tokens, 1)
        _check("calibration", "chunk_tokens", self.chunk_tokens, 16, BENCH_CONTEXT)
        _check("calibration", "task_share", self.task_share, 0, 1)
        _check("calibration", "sensitivity_tokens", self.sensitivity_tokens, 1)
        if self.tokens < self.chunk_tokens:
            raise ConfigError(
                f"[calibration].tokens: {self.tokens} is less than one chunk ([calibration].chunk_tokens = {self.chunk_tokens})"
            )


@dataclass
class BuildConfig:
    model: str = _help("builtin model name (smollm2-135m) or a local Hugging Face folder", "smollm2-135m")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    # [targets.<name>]: format options of a named target set for this config (e.g. a size budget)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: Path | None = None  # the file this config came from, for messages


_TABLES = {
    "data": DataConfig,
    "train": TrainConfig,
    "merge": MergeConfig,
    "bench": BenchConfig,
    "gates": GatesConfig,
    "calibration": CalibrationConfig,
}


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Check a TOML value against a field's type hint; ints are accepted for floats."""
    origin = getattr(hint, "__origin__", None)
    args = getattr(hint, "__args__", ())
    if value is None:
        return None
    if hint is Path or Path in args:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return value
    wanted = [a for a in (args or (hint,)) if a is not type(None)]
    if float in wanted and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if any(isinstance(value, w) and not (w is int and isinstance(value, bool)) for w in wanted):
        return value
    names = " or ".join(w.__name__ for w in wanted)
    raise ConfigError(f"{where}: expected {names}, got {value!r}")


def _build(cls: type, table: dict[str, Any], prefix: str, source: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in table.items():
        where = f"{source}: {prefix}{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key; expected one of: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(where, value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: Path | None) -> BuildConfig:
    """Read and validate a build config; ``None`` gives the defaults."""
    if path is None:
        return BuildConfig()
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return config_from_dict(raw, path)


def config_from_dict(raw: dict[str, Any], path: Path) -> BuildConfig:
    source = str(path)
    top_known = {"model", "targets", *_TABLES}
    for key in raw:
        if key not in top_known:
            raise ConfigError(f"{source}: unknown key {key!r}; expected one of: {', '.join(sorted(top_known))}")
    parts: dict[str, Any] = {}
    for name, cls in _TABLES.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        parts[name] = _build(cls, table, f"[{name}].", source)
    targets = _target_overrides(raw.get("targets", {}), source)
    model = raw.get("model", BuildConfig.model)
    if not isinstance(model, str):
        raise ConfigError(f"{source}: model: expected a string, got {model!r}")
    base = path.parent
    # A model that looks like a path is relative to the config file, like the data files.
    if "/" in model or model.startswith("."):
        model = str((base / model).resolve()) if not Path(model).is_absolute() else model
    for key in ("train", "eval", "validation"):
        p = getattr(parts["data"], key)
        if p is not None and not p.is_absolute():
            setattr(parts["data"], key, (base / p).resolve())
    return BuildConfig(model=model, targets=targets, source=path, **parts)


def _target_overrides(table: Any, source: str) -> dict[str, dict[str, Any]]:
    """``[targets.<name>]`` tables: shape only here; each is checked against its target's format when
    a build names the target (:func:`edgeft.targets.apply_overrides`), and a name no target has is
    refused then too, so a typo cannot silently leave the built-in budget in place."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [targets] must hold tables, e.g. [targets.gguf-q4-mixed]")
    for name, options in table.items():
        if not isinstance(options, dict):
            raise ConfigError(f"{source}: targets.{name}: expected a table of the target's options")
    return {name: dict(options) for name, options in table.items()}


def config_as_dict(cfg: BuildConfig) -> dict[str, Any]:
    """The resolved config, as shown by ``--dry-run`` and stored in manifests."""
    d = dataclasses.asdict(cfg)
    d["source"] = str(cfg.source) if cfg.source else None
    d["data"] = {k: str(v) if v else None for k, v in d["data"].items()}
    return d
