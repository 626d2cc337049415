"""The 4-bit NF4 base of QLoRA: how it is loaded (training, the merge that measures against it and
the report's "adapter on NF4 base" row) and its dequantized weights.

One :func:`quant_config` serves training and merging, so the ``dequant`` merge reconstructs exactly
the weights the adapter was trained against: transformers picks which linears to quantize (every
decoder linear; ``lm_head`` and the embeddings stay full precision) and bitsandbytes quantizes them
in blocks of 64 with NF4 codes and double-quantized absmax scales. The weights are cast to the
compute dtype before they are quantized, so the compute dtype is part of what the adapter saw and is
recorded in the train manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError
from .loading import loading

DTYPES = ("float32", "bfloat16")


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("[train].method = 'qlora' needs bitsandbytes: pip install 'edgeft[train]'") from None


def quant_config(compute_dtype: str) -> Any:
    """NF4 with double quantization, computing in ``compute_dtype`` (``float32`` or ``bfloat16``)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def load_nf4(model_dir: Path, compute_dtype: str, device: str = "cpu") -> Any:
    """The base model with its decoder linears in 4-bit NF4, on ``device`` (``cpu``, ``cuda:N``)."""
    import torch
    from transformers import AutoModelForCausalLM

    require_bitsandbytes()
    with loading(model_dir, "the base model in 4-bit NF4"):
        return AutoModelForCausalLM.from_pretrained(
            model_dir,
            quantization_config=quant_config(compute_dtype),
            dtype=getattr(torch, compute_dtype),
            device_map={"": device},
        )


def without_cpu_bf16_kernel(model: Any) -> Any:
    """Make the 4-bit linears compute as they did in training (mutates and returns ``model``).

    In inference mode on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks each 4-bit weight for a
    kernel that rounds its scales to bf16 (``Linear4bit.support_avx512bf16_for_cpu``); training runs the
    plain dequantize-then-matmul path in the compute dtype. On the tiny test llama the repacked model
    was 3.7e-4 (mean KLD) away from the same model computed the training way. Merges are measured
    against the model as it was trained, so the repacking is switched off here.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if not hasattr(module, "support_avx512bf16_for_cpu"):
                break  # another bitsandbytes: no such kernel switch
            module.support_avx512bf16_for_cpu = False
    return model


def adapter_on_nf4(model_dir: Path, adapter_dir: Path, compute_dtype: str, device: str = "cpu") -> Any:
    """A QLoRA adapter on its 4-bit base, computing the training way: the model as it was trained,
    which the merge strategies and the report's ladder row measure against the reference."""
    from peft import PeftModel

    base = without_cpu_bf16_kernel(load_nf4(model_dir, compute_dtype, device))
    with loading(adapter_dir, "the adapter"):
        return PeftModel.from_pretrained(base, adapter_dir)


def dequantized_weights(model: Any) -> dict[str, Any]:
    """``{parameter name: fp32 tensor}`` of every 4-bit linear's weight, dequantized. Does not mutate."""
    import bitsandbytes as bnb
    import torch

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            out[f"{name}.weight"] = bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32).cpu()
    return out


def load_dequantized(model_dir: Path, compute_dtype: str) -> Any:
    """The fp32 base model whose 4-bit linears hold dequantize(NF4(W)) instead of W."""
    import torch
    from transformers import AutoModelForCausalLM

    nf4 = load_nf4(model_dir, compute_dtype)
    weights = dequantized_weights(nf4)
    del nf4
    with loading(model_dir, "the base model"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
    return model
