"""What a build will cost in memory and disk, estimated before anything runs and measured while it runs.

**Measured.** :class:`PeakRSS` gives the peak resident set of this process over one stage. Linux
keeps a high-water mark (``VmHWM`` in ``/proc/self/status``) that writing ``5`` to
``/proc/self/clear_refs`` resets, so each stage's peak is its own, not the largest so far. Where that
is not available (macOS, a kernel that refuses the write) a stage's peak is None, never a guess.

**Estimated.** :func:`plan` reads the model's shape (safetensors headers, or a built-in's GGUF header;
no weights) and asks each stage what it holds: how many full-precision copies of the model, or how
many of its largest tensor. The coefficients below come from the code paths as they are and were
checked against measured peaks (the report's stage table puts both side by side); they are
estimates, and the refusal they drive leaves a margin rather than failing a build that would fit.
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import DTYPE_SHORT
from .errors import ConfigError
from .formats import get_format
from .loading import read_json_object
from .machine import ram_bytes
from .models import BUILTIN_MODELS, builtin_gguf_path
from .weights import read_header, weight_files

GB = 1e9

# The Python process before a stage loads anything: interpreter, torch, transformers, numpy.
BASELINE_BYTES = int(0.9 * GB)
# A build refuses when a stage's estimate is above this share of the machine's RAM: the estimates
# are rough, and the OS, page cache and the user's other work need room too.
RAM_SHARE = 0.9
# Bytes per parameter of a model torch holds for forward passes (the reference, bench-base), by dtype.
TORCH_BYTES = {"float32": 4, "bfloat16": 2}


# ---------------------------------------------------------------------------------------- measured


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _release_freed_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc's ``malloc_trim``).

    Without it a build process keeps what an earlier stage freed: on the Qwen2.5 0.5B cooking build
    every stage after training peaked at 4.3-6.5 GB where its own estimate was 1.3-3.4 GB (the
    quantize stages, which map the file tensor by tensor, at 4.3 GB). A no-op without glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak RSS of this process between :meth:`start` and :meth:`stop` (bytes, or None if unknown);
    ``start_bytes``: the RSS the stage started from (what earlier stages left behind);
    ``peak_anon_bytes``: the highest *anonymous* RSS seen, sampled every :attr:`SAMPLE_S` seconds.

    The kernel's peak (VmHWM) also counts file pages: memory-mapped shards being read, the fp32 file
    a bf16 copy is cast from. Those the kernel drops when memory is short, so they overstate what a
    stage needs (a bf16 load of Qwen2.5 1.5B: 10.5 GB peak RSS, 3.7 GB of it anonymous). The resource
    plan estimates anonymous memory; the sampled figure is the one to hold it against. Linux keeps
    no anonymous high-water mark, hence the sampling: a spike shorter than the interval can be missed."""

    SAMPLE_S = 0.02

    def __init__(self) -> None:
        self.resettable = False
        self.start_bytes: int | None = None
        self.peak_anon_bytes: int | None = None
        self._stopping = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> None:
        _release_freed_memory()
        self.start_bytes = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.resettable = _status_kb("VmHWM") is not None
        except OSError:
            self.resettable = False
        self.peak_anon_bytes = _status_kb("RssAnon")
        if self.peak_anon_bytes is not None:
            self._stopping.clear()
            self._sampler = threading.Thread(target=self._sample, name="edgeft-peak-rss", daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while not self._stopping.wait(self.SAMPLE_S):
            self._note_anon()

    def _note_anon(self) -> None:
        anon = _status_kb("RssAnon")
        if anon is not None and anon > (self.peak_anon_bytes or 0):
            self.peak_anon_bytes = anon

    def stop(self) -> int | None:
        if self._sampler is not None:
            self._stopping.set()
            self._sampler.join()
            self._sampler = None
            self._note_anon()
        return _status_kb("VmHWM") if self.resettable else None


# --------------------------------------------------------------------------------------- estimated


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need to know about a model, read from headers alone."""

    parameters: int
    largest_tensor: int  # elements of the largest tensor (the embedding or the output head)
    layers: int
    hidden: int
    vocab: int

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.parameters


@dataclass
class StageEstimate:
    stage: str
    peak_ram: int  # bytes of RSS the stage's process is expected to reach
    disk: int  # bytes the stage leaves behind (its output)
    basis: str  # what the estimate counts, for the person reading --dry-run
    hint: str = ""  # how to make it fit, when the plan is refused at this stage (else a generic one)


@dataclass(frozen=True)
class ReferenceDtype:
    """The dtype the whole-model torch passes (the reference, bench-base) load the model in, and why."""

    name: str = "float32"  # "float32" | "bfloat16"
    why: str = ""  # empty for the default fp32; else what chose it, as the report's header says it

    @property
    def short(self) -> str:
        return DTYPE_SHORT[self.name]

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "why": self.why}


@dataclass
class ResourcePlan:
    model: ModelShape
    stages: list[StageEstimate]
    ram_total: int | None
    disk_free: int | None
    notes: list[str] = field(default_factory=list)
    reference_dtype: ReferenceDtype = ReferenceDtype()

    @property
    def peak(self) -> StageEstimate:
        return max(self.stages, key=lambda s: s.peak_ram)

    @property
    def disk(self) -> int:
        return sum(s.disk for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.__dict__,
            "stages": [s.__dict__ for s in self.stages],
            "peak_ram_bytes": self.peak.peak_ram,
            "peak_stage": self.peak.stage,
            "disk_bytes": self.disk,
            "machine_ram_bytes": self.ram_total,
            "disk_free_bytes": self.disk_free,
            "reference_dtype": self.reference_dtype.to_dict(),
            "notes": self.notes,
        }


def shape_from_safetensors(model_dir: Path) -> ModelShape:
    """The shape of a local HF folder: parameter counts from its safetensors headers, sizes from config.json."""
    total, largest = 0, 0
    for f in weight_files(model_dir):
        for info in read_header(f).values():
            n = int(np.prod(info["shape"], dtype=np.int64))
            total, largest = total + n, max(largest, n)
    config = read_json_object(Path(model_dir) / "config.json", "model config")
    return _shape(total, largest, config)


def shape_from_gguf(path: Path, config: dict[str, Any] | None = None) -> ModelShape:
    """The shape of a built-in's GGUF: tensor shapes from its header (memory-mapped, nothing dequantized)."""
    import gguf

    reader = gguf.GGUFReader(path)
    counts = [int(t.n_elements) for t in reader.tensors]
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()

    def field_value(key: str, default: int = 0) -> int:
        f = reader.fields.get(key.format(arch=arch))
        return int(f.contents()) if f is not None else default

    layers = field_value(gguf.Keys.LLM.BLOCK_COUNT)
    hidden = field_value(gguf.Keys.LLM.EMBEDDING_LENGTH)
    vocab = field_value(gguf.Keys.LLM.VOCAB_SIZE) or len(reader.fields[gguf.Keys.Tokenizer.LIST].data)
    # a tied head is one tensor in the file and one in memory (transformers shares it): no extra count
    return ModelShape(sum(counts), max(counts), layers, hidden, vocab)


def _shape(total: int, largest: int, config: dict[str, Any]) -> ModelShape:
    return ModelShape(
        total,
        largest,
        int(config.get("num_hidden_layers") or 0),
        int(config.get("hidden_size") or 0),
        int(config.get("vocab_size") or 0),
    )


def model_shape(name: str) -> ModelShape:
    """A model's shape for the plan, without materialising a built-in one."""
    if name in BUILTIN_MODELS:
        return shape_from_gguf(builtin_gguf_path(name))
    return shape_from_safetensors(Path(name).expanduser())


def _activations(shape: ModelShape, batch: int, seq: int) -> int:
    """fp32 activations kept for the backward pass: about 16 hidden-sized tensors per layer and token
    (attention and MLP inputs and outputs, the MLP's 2-3× wider intermediates), plus the logits."""
    per_token = 16 * shape.hidden * shape.layers + 3 * shape.vocab
    return 4 * batch * seq * per_token


def _trains_on_gpu(device: str) -> bool:
    # without importing torch (seconds): "auto" picks CUDA when the driver's device node is there
    return device == "cuda" or (device == "auto" and Path("/dev/nvidiactl").exists())


def training_estimate(shape: ModelShape, cfg: Any) -> StageEstimate:
    t = cfg.train
    if _trains_on_gpu(t.device):
        # the weights stream through host memory one shard at a time on their way to the GPU
        return StageEstimate("train", BASELINE_BYTES + 8 * shape.largest_tensor, 0, "on the GPU (host RAM: loading)")
    acts = _activations(shape, t.batch_size, t.max_seq_len)
    if t.method == "qlora":
        # 4-bit decoder linears (~0.56 byte/param with their scales); embeddings and head stay fp32
        weights = int(0.56 * (shape.parameters - 2 * shape.largest_tensor)) + 8 * shape.largest_tensor
        basis = "NF4 base + fp32 embeddings/head + activations"
    else:
        weights = shape.fp32_bytes
        basis = "fp32 base + activations"
    return StageEstimate("train", BASELINE_BYTES + weights + acts, 0, basis)


def torch_copy_bytes(shape: ModelShape, dtype: str) -> int:
    """Peak RSS of a torch process holding one copy of the model in ``dtype`` for forward passes.

    Anonymous memory, what must fit. Loading a bf16 copy from the fp32 folder also maps the fp32 file
    while it converts (measured on Qwen2.5 0.5B: 1.46 GB anonymous + 2.49 GB of file pages at the
    peak, 1.55 GB once loaded): page cache, which the kernel drops when memory is short, but the
    stage's measured high-water mark counts it on a machine with room to spare."""
    return BASELINE_BYTES + TORCH_BYTES[dtype] * shape.parameters


def reference_dtype(shape: ModelShape, choice: str, ram_total: int | None) -> ReferenceDtype:
    """``[bench].reference_dtype`` resolved: ``auto`` is float32 where one fp32 copy fits this machine's
    RAM (or the RAM is unknown), else bfloat16, whether or not that fits (:func:`check_fits` says)."""
    if choice != "auto":
        return ReferenceDtype(choice, "" if choice == "float32" else f"[bench].reference_dtype = {choice!r}")
    need = torch_copy_bytes(shape, "float32")
    if not ram_total or need <= RAM_SHARE * ram_total:
        return ReferenceDtype()
    return ReferenceDtype("bfloat16", f"fp32 would need {need / GB:.1f} GB, this machine has {ram_total / GB:.1f} GB")


def machine_reference_dtype(model_dir: Path, choice: str) -> ReferenceDtype:
    """:func:`reference_dtype` for a local HF folder on this machine (``edgeft bench --reference HF_FOLDER``,
    which has no build plan)."""
    return reference_dtype(shape_from_safetensors(model_dir), choice, _env_bytes("EDGEFT_RAM_BYTES") or ram_bytes())


_FP32_HINT = "; set [bench].reference_dtype = 'auto' (bf16 where fp32 does not fit) or 'bfloat16'"
# The unquantized export's ladder row is measured on the whole fp32 file: refused where fp32 does not fit.
LADDER_EXPORT_HINT = "; set [bench].ladder_export = false (the unquantized export's row holds the whole fp32 model)"


def _torch_pass(stage: str, shape: ModelShape, dtype: ReferenceDtype) -> StageEstimate:
    """A stage that runs the whole model in torch, in the build's reference dtype."""
    peak = torch_copy_bytes(shape, dtype.name)
    if dtype.name == "float32":
        # refused only where fp32 was asked for: `auto` picks fp32 only where it fits
        return StageEstimate(stage, peak, 0, "one fp32 copy (torch forward passes)", _FP32_HINT)
    fp32 = torch_copy_bytes(shape, "float32")
    return StageEstimate(stage, peak, 0, f"one {dtype.short} copy for torch, fp32 would need {fp32 / GB:.1f} GB")


def plan(cfg: Any, targets: list[Any], out_dir: Path, shape: ModelShape | None = None) -> ResourcePlan:
    """Estimated peak RAM of each stage of ``edgeft build`` and the disk the build leaves, with what
    this machine has; and the dtype of the torch passes that fits it (:func:`reference_dtype`)."""
    shape = shape or model_shape(str(cfg.model))
    fp32 = shape.fp32_bytes
    ram_total = _env_bytes("EDGEFT_RAM_BYTES") or ram_bytes()
    ref_dtype = reference_dtype(shape, cfg.bench.reference_dtype, ram_total)
    stages: list[StageEstimate] = []

    if str(cfg.model) in BUILTIN_MODELS:
        # the GGUF's tensors dequantized into an fp32 model, then saved (one copy + shard buffer)
        stages.append(StageEstimate("model", BASELINE_BYTES + int(1.3 * fp32), fp32, "fp32 model from the GGUF"))
    stages.append(training_estimate(shape, cfg))
    stages.append(_merge_estimate(shape, cfg))
    stages.append(_torch_pass("reference", shape, ref_dtype))
    stages.append(_torch_pass("bench-base", shape, ref_dtype))
    seen: set[str] = set()
    for target in targets:
        for est in get_format(target.format).resource_estimates(target, shape, cfg.bench.ladder_export):
            if est.stage not in seen:  # a shared stage (the F32 export) counts once
                seen.add(est.stage)
                stages.append(est)
    out_dir = Path(out_dir).absolute()
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), Path("/"))
    return ResourcePlan(shape, stages, ram_total, _free_disk(existing), reference_dtype=ref_dtype)


def _merge_estimate(shape: ModelShape, cfg: Any) -> StageEstimate:
    """The streaming merge (:mod:`edgeft.merge_stream`) holds a few fp32 tensors at a time; ``auto``
    then measures each written candidate against the NF4 teacher, one fp32 copy at a time (measured
    on a 0.5B: fp 1.13 GB, dequant 1.15 GB, auto 3.95 GB)."""
    strategy = "fp" if cfg.train.method == "lora" else cfg.merge.strategy
    peak = BASELINE_BYTES + 3 * 4 * shape.largest_tensor
    disk = shape.fp32_bytes
    if strategy == "auto":
        # one fp32 candidate + the NF4 teacher (~0.6 byte/param with its fp32 embedding and head)
        peak = max(peak, BASELINE_BYTES + shape.fp32_bytes + int(0.6 * shape.parameters) + 8 * shape.largest_tensor)
        disk = 2 * shape.fp32_bytes  # both candidates are written before one is kept
        return StageEstimate("merge", peak, disk, "one fp32 candidate at a time + the NF4 teacher")
    return StageEstimate("merge", peak, disk, "tensor by tensor: 3 × the largest fp32 tensor")


def check_fits(resources: ResourcePlan, where: str) -> None:
    """Refuse, in one line naming the stage, a build whose estimate exceeds this machine's RAM or disk."""
    peak = resources.peak
    if resources.ram_total and peak.peak_ram > RAM_SHARE * resources.ram_total:
        raise ConfigError(
            f"{where}: stage {peak.stage} needs about {peak.peak_ram / GB:.1f} GB of RAM ({peak.basis}, "
            f"{resources.model.parameters / 1e9:.2f} B parameters); this machine has {resources.ram_total / GB:.1f} GB"
            f"{peak.hint or _hint(peak.stage)}"
        )
    if resources.disk_free is not None and resources.disk > resources.disk_free:
        raise ConfigError(
            f"{where}: the build writes about {resources.disk / GB:.1f} GB; only {resources.disk_free / GB:.1f} GB "
            "free where --out is; free space or choose another --out"
        )


def _hint(stage: str) -> str:
    if stage == "train":
        return "; use [train].method = 'qlora' on a GPU, a smaller batch_size or max_seq_len"
    return "; use a machine with more memory"


def render(resources: ResourcePlan) -> str:
    """The plan as the lines ``--dry-run`` prints."""
    m = resources.model
    lines = [
        f"resource plan (estimates): {m.parameters / 1e9:.2f} B parameters, {m.layers} layers, "
        f"fp32 {m.fp32_bytes / GB:.2f} GB, largest tensor {4 * m.largest_tensor / GB:.2f} GB",
        f"  {'stage':<26} {'peak RAM GB':>11} {'disk GB':>8}  basis",
    ]
    for s in resources.stages:
        lines.append(f"  {s.stage:<26} {s.peak_ram / GB:>11.2f} {s.disk / GB:>8.2f}  {s.basis}")
    ram = f"{resources.ram_total / GB:.1f} GB" if resources.ram_total else "unknown"
    disk = f"{resources.disk_free / GB:.1f} GB free" if resources.disk_free is not None else "unknown"
    lines.append(
        f"  peak {resources.peak.peak_ram / GB:.2f} GB ({resources.peak.stage}) of {ram} RAM; "
        f"disk {resources.disk / GB:.2f} GB of {disk}"
    )
    if resources.reference_dtype.why:
        ref = resources.reference_dtype
        lines.append(f"  reference and bench-base computed in {ref.short} ({ref.why})")
    return "\n".join(lines)


def _free_disk(path: Path) -> int | None:
    return _env_bytes("EDGEFT_DISK_FREE_BYTES") or shutil.disk_usage(path).free


def _env_bytes(name: str) -> int | None:
    """``EDGEFT_RAM_BYTES`` / ``EDGEFT_DISK_FREE_BYTES`` plan for a machine of that size (a smaller CI
    runner, a test of the refusal) instead of this one."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None
