"""A LoRA adapter folder checked against the base model it is meant for, before peft reads it.

peft loads a mismatched adapter and then fails deep in ``load_state_dict`` with a table of size
mismatches, or silently skips keys it cannot place. Here the folder's ``adapter_config.json`` and the
shapes in ``adapter_model.safetensors`` (read from the header, no torch) are compared with the base
model's config: every LoRA tensor must belong to a layer the base has, to a module it can adapt, and
have ``lora_A`` = [r, in_features] and ``lora_B`` = [out_features, r] for that module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import ModelError
from .loading import read_json_object
from .models import LAYER_LINEARS, OTHER_ADAPTABLE
from .weights import first_nonfinite, tensor_shapes

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight → layer 3, module q_proj, A
_LORA_TENSOR = re.compile(
    r"\.layers\.(?P<layer>\d+)\..*?(?P<module>[A-Za-z0-9_]+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA adapter folder, with its weights file's header checked."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.exists():
        raise ModelError(f"{adapter_dir}: no such adapter folder")
    if not adapter_dir.is_dir():
        raise ModelError(f"{adapter_dir}: expected a peft adapter folder, found a file")
    path = adapter_dir / CONFIG
    config = read_json_object(path, f"{adapter_dir}: not a peft adapter folder ({CONFIG} missing)")
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{path}: peft_type: expected 'LORA', got {config.get('peft_type')!r}")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ModelError(f"{path}: r: expected a positive integer, got {r!r}")
    if not (adapter_dir / WEIGHTS).is_file():
        raise ModelError(f"{adapter_dir}: {WEIGHTS} missing (adapters saved as *.bin are not read; use safetensors)")
    tensor_shapes(adapter_dir / WEIGHTS)  # header and size check
    return config


def rank_of(config: dict[str, Any], module: str) -> int:
    """The rank peft gives ``module`` (e.g. ``model.layers.0.self_attn.q_proj``): the first key of
    ``rank_pattern`` that matches the end of its name (peft's ``get_pattern_key``), else ``r``."""
    pattern = config.get("rank_pattern") or {}
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return config["r"]


def check_adapter(adapter_dir: Path, base_config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """Raise ModelError unless the adapter fits a base model with ``base_config``; return its config."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / WEIGHTS
    shapes = tensor_shapes(weights)
    if not shapes:
        raise ModelError(f"{weights}: holds no tensors")
    linears = LAYER_LINEARS[architecture](base_config)
    layers = base_config["num_hidden_layers"]
    base_name = config.get("base_model_name_or_path") or "another model"
    for name, shape in shapes.items():
        m = _LORA_TENSOR.search(name)
        if m is None:
            if any(f".{mod}." in name for mod in OTHER_ADAPTABLE):
                continue  # lm_head / embed_tokens adapters: peft checks their shapes on load
            raise ModelError(f"{weights}: tensor {name} is not a LoRA weight of a decoder layer")
        layer, module, ab = int(m["layer"]), m["module"], m["ab"]
        if layer >= layers:
            raise ModelError(
                f"{adapter_dir}: adapter has layer {layer}, the base model only {layers} layers "
                f"(the adapter was trained on {base_name})"
            )
        if module not in linears:
            raise ModelError(f"{weights}: tensor {name}: module {module!r} is not in the base model")
        n_in, n_out = linears[module]
        r = rank_of(config, name[: m.start("ab") - len(".lora_")].removeprefix("base_model.model."))
        want = (r, n_in) if ab == "A" else (n_out, r)
        if tuple(shape) != want:
            raise ModelError(
                f"{adapter_dir}: {module} lora_{ab} is {list(shape)}, the base model needs {list(want)}: "
                f"the adapter belongs to another base model ({base_name})"
            )
    bad = first_nonfinite(weights)
    if bad is not None:
        raise ModelError(f"{weights}: tensor {bad} holds NaN or Inf values; the adapter is broken")
    return config
