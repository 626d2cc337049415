"""HF → GGUF in process, on top of the ``gguf`` package, for the families in :mod:`.families`.

The file written is what llama.cpp's own converter writes for such a model: the same
hyperparameter keys, the family's tensor transforms (llama's q/k rotary permutation, gemma's
``1 + w`` norms), 1-D tensors kept in f32, no ``output.weight`` when the LM head is tied to the
embeddings, and tokenizer metadata from :mod:`.tokenizer`.

Tensors are streamed one at a time from safetensors to the output file, so peak memory is about
one tensor, not the whole model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...errors import ConfigError, ModelError
from ...loading import loading
from ...models import check_model_dir
from ...stage import StageOutput, content_hash, run_stage
from . import fallback
from .families import FAMILIES, Family, family_of, is_tied, permute_rotary, rotary_heads
from .inspect import GGUF_FILE
from .tokenizer import add_tokenizer, pre_tokenizer_name, read_tokenizer_json

# outtype → (general.file_type, numpy dtype of 2-D tensors). 1-D tensors (norms, biases) stay f32
# whatever the outtype, as in llama.cpp: they are tiny and ggml's norm kernels expect f32.
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, type[np.floating]]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, np.float32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, np.float16),
}

# numpy dtype of a written tensor → its ggml type.
_GGML_TYPES: dict[type[np.floating], gguf.GGMLQuantizationType] = {
    np.float32: gguf.GGMLQuantizationType.F32,
    np.float16: gguf.GGMLQuantizationType.F16,
}

# HF architecture → llama.cpp architecture, for every family the native exporter writes.
ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {name: family.arch for name, family in FAMILIES.items()}

# HF tensors llama.cpp recomputes instead of loading.
_SKIPPED_TENSORS = (".rotary_emb.inv_freq",)

__all__ = ["ARCHITECTURES", "OUTTYPES", "export", "permute_rotary", "write_gguf"]


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the output file: where it comes from and how it is written."""

    hf_name: str
    source: Path
    name: str
    shape: tuple[int, ...]
    dtype: type[np.floating]
    rotary_heads: int  # > 0: rows get the rotary permutation for this many heads
    shift: float  # added to every value (gemma's 1 + w norms)
    computed: np.ndarray | None = None  # a tensor the family computes (llama3's rope_freqs), not read


def export(model_dir: Path, out_dir: Path, outtype: str = "f32") -> StageOutput:
    """Stage wrapper: write ``out_dir/model.gguf`` (cached by model content and outtype)."""
    _check_outtype(outtype)
    inputs = {"model": content_hash(model_dir)}
    params = {"outtype": outtype}
    return run_stage(out_dir, "export", inputs, params, lambda tmp: write_gguf(model_dir, tmp / GGUF_FILE, outtype))


def write_gguf(model_dir: Path, out_file: Path, outtype: str = "f32") -> dict[str, Any]:
    """Convert the HF model in ``model_dir`` to a GGUF file; return what was written.

    A family of :mod:`.families` is written here; any other architecture goes to llama.cpp's own
    converter (:mod:`.fallback`), and ``converter`` in the result says which one wrote the file.
    Raises ModelError for a folder it cannot convert faithfully (rope scaling, tokenizer, an
    architecture neither knows), ConfigError for an unknown ``outtype``.
    """
    _check_outtype(outtype)
    model_dir = Path(model_dir)
    config = check_model_dir(model_dir, any_architecture=True)
    found = family_of(config)
    if found is None:
        return {"hf_architecture": config["architectures"][0], **fallback.convert(model_dir, Path(out_file), outtype)}
    hf_arch, family = found
    file_type, dtype = OUTTYPES[outtype]
    tokenizer_json = read_tokenizer_json(model_dir)
    pre = pre_tokenizer_name(model_dir, tokenizer_json)
    tensors = _plan_tensors(model_dir, config, family, dtype)

    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[family.arch])
    try:  # in the order the file is laid out: header, key-values, tensor infos, tensor data
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(model_dir.name)
        family.hparams(writer, model_dir, config)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, model_dir, config, tokenizer_json, pre)
        for t in tensors:
            n_bytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
            writer.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), n_bytes, _GGML_TYPES[t.dtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(_load_tensor(t))
    except BaseException:
        writer.close()
        Path(out_file).unlink(missing_ok=True)  # never leave a truncated GGUF behind
        raise
    writer.close()

    types = Counter(_GGML_TYPES[t.dtype].name for t in tensors)
    return {
        "converter": "edgeft",
        "hf_architecture": hf_arch,
        "architecture": gguf.MODEL_ARCH_NAMES[family.arch],
        "outtype": outtype,
        "n_tensors": len(tensors),
        "tensor_types": dict(sorted(types.items())),
        "tokenizer_pre": pre,
        "tied_embeddings": is_tied(family, config),
        "bytes": out_file.stat().st_size,
    }


def _check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors weights; save the model with safetensors")
    return files


def _plan_tensors(model_dir: Path, config: dict[str, Any], family: Family, dtype: type[np.floating]) -> list[_Tensor]:
    """Map every HF tensor to its GGUF name, type and transforms, without loading any data."""
    from safetensors import safe_open

    arch_name = gguf.MODEL_ARCH_NAMES[family.arch]
    name_map = gguf.TensorNameMap(family.arch, config["num_hidden_layers"])
    tied = is_tied(family, config)
    heads = rotary_heads(family, config)
    plan: list[_Tensor] = []
    for path in _safetensors_files(model_dir):
        with loading(path, "safetensors weights"), safe_open(path, framework="pt") as f:
            for hf_name in f.keys():
                if hf_name.endswith(_SKIPPED_TENSORS):
                    continue
                mapped = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
                if mapped is None:
                    raise ModelError(f"{path}: tensor {hf_name} has no GGUF name for {arch_name}")
                kind, name = mapped
                # Tied head: llama.cpp reuses token_embd when output.weight is absent.
                if kind == gguf.MODEL_TENSOR.OUTPUT and tied:
                    continue
                shape = tuple(f.get_slice(hf_name).get_shape())
                plan.append(
                    _Tensor(
                        hf_name=hf_name,
                        source=path,
                        name=name,
                        shape=shape,
                        dtype=dtype if len(shape) > 1 else np.float32,
                        rotary_heads=heads.get(kind, 0),
                        shift=family.norm_shift if hf_name.endswith("norm.weight") else 0.0,
                    )
                )
    for name, values in (family.extra_tensors(model_dir, config) if family.extra_tensors else {}).items():
        plan.append(_Tensor(name, model_dir / "config.json", name, values.shape, np.float32, 0, 0.0, values))
    names = {t.name for t in plan}
    output = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    if not tied and output not in names:
        raise ModelError(f"{model_dir}: no lm_head.weight and tie_word_embeddings is false in config.json")
    return plan


def _load_tensor(t: _Tensor) -> np.ndarray:
    """Read one tensor as fp32 (any stored dtype, bf16 included), transform, cast to its GGUF type."""
    from safetensors import safe_open

    if t.computed is not None:
        return np.ascontiguousarray(t.computed, dtype=np.float32)
    with loading(t.source, f"tensor {t.hf_name}"), safe_open(t.source, framework="pt") as f:
        data = f.get_tensor(t.hf_name).float().numpy()
    if not np.isfinite(data).all():  # a broken model must not become a shippable artifact
        raise ModelError(f"{t.source}: tensor {t.hf_name} holds NaN or Inf values; refusing to export it")
    if t.rotary_heads:
        data = permute_rotary(data, t.rotary_heads)
    if t.shift:
        data = data + np.float32(t.shift)
    return np.ascontiguousarray(data.astype(t.dtype, copy=False))
