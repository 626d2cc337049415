"""Importance matrices for llama.cpp's quantizer, measured on a calibration set (stage `imatrix`).

What llama.cpp's ``llama-imatrix`` collects, and what its quantizer weighs each column's rounding error
by: for every matrix the model multiplies activations with, the sum over calibration tokens of each
input column's squared activation, and the token count. Here the merged fp32 model runs on the
calibration chunks in transformers, with a forward pre-hook on every ``nn.Linear`` of the decoder
layers; module names become GGUF tensor names through gguf-py's ``TensorNameMap`` for the GGUF file's
own architecture, so the matrix fits the file it will quantize.

The file is the GGUF imatrix format of current llama.cpp (``general.type = "imatrix"``, tensors
``<name>.in_sum2`` [1 × n_in] and ``<name>.counts`` [1 × 1], keys ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size``), so ``llama-quantize --imatrix`` reads it too. The
token embedding gets no entry: it is looked up, not multiplied, and llama.cpp quantizes it without one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError, ModelError
from ...files import sha256_file
from ...loading import loading
from ...stage import StageOutput, content_hash, run_stage
from .inspect import GGUF_FILE, read_gguf
from .types import K_QUANTS

IMATRIX_FILE = "imatrix.gguf"
SUM = ".in_sum2"
COUNT = ".counts"


def _name_map(gguf_path: Path) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """gguf-py's name map for the file's architecture, and the file's tensor shapes (ggml order)."""
    import gguf

    reader = read_gguf(gguf_path)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch_name = arch_field.contents() if arch_field is not None else None
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise ModelError(f"{gguf_path}: architecture {arch_name!r} unknown to gguf-py; cannot name its tensors")
    n_layer = reader.get_field(f"{arch_name}.block_count")
    blocks = int(n_layer.contents()) if n_layer is not None else 0
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    return gguf.TensorNameMap(arch, blocks), shapes


def collect(
    model_dir: Path, gguf_path: Path, chunks: np.ndarray, threads: int = 0
) -> dict[str, tuple[np.ndarray, int]]:
    """GGUF tensor name → (sum of squared input activations per column [float64], token count)."""
    import torch
    from transformers import AutoModelForCausalLM

    name_map, shapes = _name_map(gguf_path)
    if threads > 0:
        torch.set_num_threads(threads)
    with loading(model_dir, "the merged model"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    stats: dict[str, list[Any]] = {}
    hooks = []
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        name = name_map.get_name(module_name + ".weight", try_suffixes=(".weight",))
        if name is None or name not in shapes or name.startswith("token_embd"):
            continue  # the tied head (it is token_embd in the file) and anything the file lacks
        if shapes[name][0] != module.in_features:
            raise ModelError(
                f"{gguf_path}: {name} has {shapes[name][0]} columns, the model's {module_name} {module.in_features}"
            )
        acc = stats.setdefault(name, [torch.zeros(module.in_features, dtype=torch.float64), 0])

        def hook(_mod, args, acc=acc):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            acc[0] += (x * x).sum(dim=0)
            acc[1] += x.shape[0]

        hooks.append(module.register_forward_pre_hook(hook))
    if not stats:
        raise ModelError(f"{model_dir}: no linear layer maps to a tensor of {gguf_path}")
    try:
        with torch.no_grad():
            for chunk in chunks:
                # the tied head gets no entry: skip its logits for all but one position
                model(input_ids=torch.as_tensor(chunk, dtype=torch.long)[None, :], logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return {name: (acc[0].numpy(), int(acc[1])) for name, acc in sorted(stats.items())}


def write(
    path: Path, stats: dict[str, tuple[np.ndarray, int]], dataset: str, chunk_count: int, chunk_size: int
) -> None:
    """Save in llama.cpp's GGUF imatrix layout."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="imatrix")  # gguf-py always writes an architecture key
    writer.add_type("imatrix")
    writer.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunk_count)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
    for name, (sums, count) in stats.items():
        writer.add_tensor(name + SUM, np.asarray(sums, dtype=np.float32)[None, :])
        writer.add_tensor(name + COUNT, np.asarray([[count]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read(path: Path) -> dict[str, np.ndarray]:
    """GGUF tensor name → per-column mean squared activation, what ``llama_model_quantize`` takes.

    A file that is not an imatrix, or has a count of zero or non-finite values, is refused naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: imatrix file not found")
    reader = read_gguf(path)
    kind = reader.get_field("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise ModelError(f"{path}: not an importance matrix (general.type is not 'imatrix')")
    with loading(path, "imatrix"):
        tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in reader.tensors}
    out = {}
    for key, sums in tensors.items():
        if not key.endswith(SUM):
            continue
        name = key[: -len(SUM)]
        counts = tensors.get(name + COUNT)
        if counts is None or counts.size != 1 or not counts[0] > 0:
            raise ModelError(f"{path}: {name}: missing or zero {COUNT[1:]}")
        mean = sums / counts[0]
        if not np.isfinite(mean).all() or (mean < 0).any():
            raise ModelError(f"{path}: {name}: non-finite or negative values")
        out[name] = mean.astype(np.float32)
    if not out:
        raise ModelError(f"{path}: no {SUM} tensors; not an importance matrix")
    return out


def check_matches(imatrix: dict[str, np.ndarray], gguf_path: Path, where: Path) -> None:
    """Every entry names a tensor of ``gguf_path`` with as many columns: a matrix measured on another
    model would otherwise be half-used silently (llama.cpp aborts on some mismatches, skips others)."""
    shapes = {t.name: int(t.shape[0]) for t in read_gguf(gguf_path).tensors}
    for name, values in imatrix.items():
        if name not in shapes:
            raise ModelError(f"{where}: entry {name} is not a tensor of {gguf_path}; an imatrix of another model?")
        if values.size != shapes[name]:
            raise ModelError(f"{where}: {name} has {values.size} values, the tensor {shapes[name]} columns")


def scope(imatrix: dict[str, np.ndarray], gguf_path: Path, quant: str) -> tuple[dict[str, np.ndarray], str]:
    """The entries to hand to llama.cpp for a ``quant`` mix, and the rule that chose them.

    A K-quant mix (Q4_K_M, …) stores rows whose width is not a multiple of 256 in a legacy type
    instead (SmolLM2-135M: every 576-wide row becomes Q5_0/Q8_0). Measured on the cooking build
    (mean KLD against F32 over 16 held-out conversations, every position): Q4_K_M 0.1894 without a
    matrix, 0.2101 with it on every tensor, 0.1759 with it on the K-quant tensors only; Q4_0 0.8381
    without, 0.5479 with it on every tensor. So a K-quant mix gets the matrix on its 256-multiple
    rows only, a legacy type on every tensor."""
    if quant not in K_QUANTS:
        return imatrix, "all"
    widths = {t.name: int(t.shape[0]) for t in read_gguf(gguf_path).tensors}
    return {k: v for k, v in imatrix.items() if widths[k] % 256 == 0}, "k-quant rows (width % 256 == 0)"


def imatrix_stage(merged_dir: Path, gguf_dir: Path, out_dir: Path, calibration: Any, threads: int = 0) -> StageOutput:
    """Cached stage: the merged model + its F32 GGUF + a calibration set → ``out_dir/imatrix.gguf``."""
    gguf_path = Path(gguf_dir) / GGUF_FILE
    inputs = {"merged": content_hash(merged_dir), "gguf": content_hash(gguf_dir)}
    params = {"calibration": calibration.describe()}

    def work(tmp: Path) -> dict[str, Any]:
        stats = collect(Path(merged_dir), gguf_path, calibration.chunks, threads)
        dataset = f"edgeft calibration {calibration.source} sha256:{calibration.sha256}"
        write(tmp / IMATRIX_FILE, stats, dataset, int(calibration.chunks.shape[0]), int(calibration.chunks.shape[1]))
        digest = sha256_file(tmp / IMATRIX_FILE)
        return {
            "imatrix_sha256": digest,
            "calibration": calibration.describe(),
            "entries": len(stats),
            "tokens": int(next(iter(stats.values()))[1]),
        }

    return run_stage(out_dir, "imatrix", inputs, params, work)
