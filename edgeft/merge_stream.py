"""The streaming merge: base + LoRA adapter folded one tensor at a time, memory independent of the model.

Each output tensor is read from the base's safetensors shards (:mod:`edgeft.shards`, plain reads),
made fp32, optionally NF4-round-tripped (the ``dequant`` base), given every LoRA delta aimed at it
(``W += scale · B @ A`` in fp32, in row blocks of at most :data:`DELTA_BLOCK_BYTES`), checked finite
and written to an output shard before the next one is read. Peak memory: the interpreter and torch,
plus the largest tensor in fp32 and a few blocks of 64 MB (its conversion from bf16, the delta, the
finiteness check), or for ``dequant`` a 4-bit linear's NF4 copies.

What is merged where, and with which scale, is peft's own decision: the adapter's config is applied
with ``peft.inject_adapter_in_model`` to a skeleton of the model on the ``meta`` device (no weights),
and its LoRA layers give the targeted modules, ``r`` and ``scaling`` (``lora_alpha / r``, or
``/ sqrt(r)`` with rslora, ``rank_pattern`` / ``alpha_pattern`` resolved). :func:`plan` then
reproduces what ``PeftModel.from_pretrained(...).merge_and_unload(safe_merge=True)`` followed by
``save_pretrained`` does:

- Linear LoRA: ``W + (B @ A) * scale``; embedding LoRA: ``W + (B @ A).T * scale`` with
  ``lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [dim, r];
- tied embeddings (one tensor behind ``embed_tokens`` and ``lm_head``): every delta aimed at either
  lands on the one tensor, in module order (embedding first), and only the embedding is written;
- ``modules_to_save`` copies replace the module's tensors; on a tied pair that unties it (both
  tensors written, ``tie_word_embeddings`` false in config.json, as peft sets it);
- embedding layers peft saved beside their LoRA (``<module>.base_layer.weight``) replace the base's.

Anything else raises :class:`Unsupported` with the reason, and the caller falls back to peft on the
fully loaded model: DoRA and other LoRA variants, ``fan_in_fan_out``, LoRA biases or trained biases,
LoRA on layers other than Linear/Embedding, trainable tokens, adapter tensors it cannot place, any
adapter_config.json key outside :data:`_MERGE_NEUTRAL_KEYS` with a non-default value, non-float or
quantized bases, checkpoints whose tensor names differ from the model's.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ModelError
from .loading import loading
from .nf4 import quant_config, require_bitsandbytes
from .shards import FLOAT_DTYPES, MAX_SHARD_BYTES, OutTensor, StoredTensor, read_tensor, stored_tensors, write_shards
from .weights import weight_files

DELTA_BLOCK_BYTES = 64 << 20  # fp32 rows of B @ A computed at a time

ADAPTER_PREFIX = "base_model.model."  # where peft's saved names start (PeftModel → LoraModel → the HF model)

# adapter_config.json keys that say how the adapter was trained or where it was placed, not what
# merging it computes (placement comes from peft itself, on the skeleton). Any other key with a
# value other than LoraConfig's default sends the merge to peft.
_MERGE_NEUTRAL_KEYS = frozenset(
    {
        "r",
        "lora_alpha",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "lora_dropout",
        "init_lora_weights",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "qalora_group_size",  # used only with use_qalora, which is checked
        "runtime_config",
        "megatron_core",
        "base_model_name_or_path",
        "revision",
        "task_type",
        "peft_type",
        "peft_version",
        "inference_mode",
        "auto_mapping",
    }
)


class Unsupported(Exception):
    """The streaming merge would not compute exactly what peft computes; the message says why."""


@dataclass
class Delta:
    """One LoRA pair folded into a tensor: the adapter's A and B and peft's scale."""

    module: str
    embedding: bool  # lora_embedding_A [r, vocab] / lora_embedding_B [dim, r]; else lora_A [r, in] / lora_B [out, r]
    a: StoredTensor
    b: StoredTensor
    scale: float


@dataclass
class Slot:
    """One tensor of the merged model: where its values start from and what is added to it."""

    name: str  # the name it is written under
    source: StoredTensor  # the base's tensor, or the adapter's replacement
    deltas: list[Delta] = field(default_factory=list)
    nf4: bool = False  # a 4-bit linear's weight when the base is loaded in NF4 (the dequant strategy)
    parameter: bool = True  # False for a persistent buffer
    replaced: bool = False  # the source is the adapter's copy, not the base's tensor

    @property
    def out_dtype(self) -> str:
        return "F32" if self.source.dtype in FLOAT_DTYPES else self.source.dtype


@dataclass
class Plan:
    """Everything the streaming merge writes, decided before any tensor is read."""

    model_dir: Path
    adapter_dir: Path
    slots: list[Slot]
    config: Any  # transformers PretrainedConfig of the merged model (dtype, architectures, tying set)

    @property
    def parameters(self) -> int:
        return sum(math.prod(s.source.shape) for s in self.slots if s.parameter)


def plan(model_dir: Path, adapter_dir: Path, nf4: bool = False) -> Plan:
    """Decide every output tensor of base + adapter; raises :class:`Unsupported` where peft must do it.
    ``nf4``: the plan is also for the NF4-dequantized base (``dequant``, ``auto``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    with loading(model_dir, "the model config"):
        config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "quantization_config", None):
        raise Unsupported("the base model is quantized (config.json has a quantization_config)")
    lora_config = _lora_config(adapter_dir)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as e:  # transformers' own load then says what is wrong
        raise Unsupported(f"no skeleton of the model from its config ({type(e).__name__}: {e})") from None
    state = skeleton.state_dict(keep_vars=True)  # what save_pretrained writes, tied names included
    params = {id(p) for p in skeleton.parameters()}
    first: dict[int, str] = {}
    for name, value in state.items():
        first.setdefault(id(value), name)
    group = {name: first[id(value)] for name, value in state.items()}  # tied names share one tensor
    quantized = _nf4_weights(skeleton)
    base = _base_tensors(model_dir)
    adapter = _AdapterTensors(adapter_dir)
    layers, saved = _inject(lora_config, skeleton)  # parameters keep their identity: state still names them
    # modules_to_save: the module's tensors become the adapter's copies, each a tensor of its own
    copies = {n: adapter.take(ADAPTER_PREFIX + n) for module, _ in saved for n in state if n.startswith(module + ".")}
    owner, slots = _output_slots(state, group, copies, base, params, quantized)
    untied = any(owner[n] != owner[group[n]] for n in state)
    _attach_deltas(layers, slots, owner, adapter)
    left = adapter.unused()
    if left:
        raise Unsupported(f"adapter tensor {left[0]} is not a LoRA pair, saved layer or modules_to_save copy")
    for slot in slots.values():
        if nf4 and slot.nf4 and slot.replaced:
            raise Unsupported(f"{slot.name}: an adapter copy replaces a layer that is 4-bit in the NF4 base")
    config.dtype = "float32"  # what save_pretrained records for an fp32 model
    config.architectures = [type(skeleton).__name__]
    if untied:  # what merge_and_unload sets when the embedding and head are no longer one tensor
        config.tie_word_embeddings = False
    return Plan(model_dir, adapter_dir, list(slots.values()), config)


class _AdapterTensors:
    """The adapter file's tensors, each taken by the plan at most once; what is left was not understood."""

    def __init__(self, adapter_dir: Path):
        self.adapter_dir = adapter_dir
        self.tensors = stored_tensors(adapter_dir / "adapter_model.safetensors")
        self.used: set[str] = set()

    def take(self, key: str) -> StoredTensor:
        if key not in self.tensors:  # peft would load the rest and leave this module as initialised: no delta
            raise ModelError(
                f"{self.adapter_dir}: adapter_config.json targets a module adapter_model.safetensors has no {key} for; "
                "the adapter does not belong to this model's layout"
            )
        self.used.add(key)
        return self.tensors[key]

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def _output_slots(
    state: dict[str, Any],
    group: dict[str, str],
    copies: dict[str, StoredTensor],
    base: dict[str, StoredTensor],
    params: set[int],
    quantized: set[str],
) -> tuple[dict[str, str], dict[str, Slot]]:
    """(state name → the output tensor it is, output tensor → its slot): tied names share one slot
    unless modules_to_save gave one of them its own copy."""
    owner = {}  # state name → the name of the output tensor it is
    for name in state:
        if name in copies:
            owner[name] = name
        else:
            owner[name] = next(n for n in state if group[n] == group[name] and n not in copies)
    slots: dict[str, Slot] = {}
    for name in dict.fromkeys(owner.values()):
        if name in copies:
            source = copies[name]
        elif group[name] in base:  # tied: transformers loads the first name and ties the rest to it
            source = base[group[name]]
        else:
            raise Unsupported(f"the base checkpoint has no tensor {group[name]} (its names are not the model's)")
        if tuple(source.shape) != tuple(state[name].shape):
            raise Unsupported(f"{name} is {list(source.shape)} in its file, {list(state[name].shape)} in the model")
        if source.dtype not in FLOAT_DTYPES and id(state[name]) in params:
            raise Unsupported(f"{name} is stored as {source.dtype}")
        parameter = id(state[name]) in params
        slots[name] = Slot(name, source, nf4=name in quantized, parameter=parameter, replaced=name in copies)
    return owner, slots


def _attach_deltas(layers: list[Any], slots: dict[str, Slot], owner: dict[str, str], adapter: _AdapterTensors) -> None:
    """Each LoRA layer's (A, B, scaling) onto its slot, checked against peft's shapes."""
    for module, layer, embedding in layers:  # module order: the order merge_and_unload folds them in
        slot = slots[owner[module + ".weight"]]
        if embedding:
            a, b = (
                adapter.take(f"{ADAPTER_PREFIX}{module}.lora_embedding_A"),
                adapter.take(f"{ADAPTER_PREFIX}{module}.lora_embedding_B"),
            )
        else:
            a, b = (
                adapter.take(f"{ADAPTER_PREFIX}{module}.lora_A.weight"),
                adapter.take(f"{ADAPTER_PREFIX}{module}.lora_B.weight"),
            )
        r = layer.r["default"]
        rows, cols = slot.source.shape
        want = ((r, rows), (cols, r)) if embedding else ((r, cols), (rows, r))
        if (tuple(a.shape), tuple(b.shape)) != want:
            got = [list(a.shape), list(b.shape)]
            raise Unsupported(f"{module}: LoRA tensors {got}, peft expects {[list(w) for w in want]}")
        saved_layer = f"{ADAPTER_PREFIX}{module}.base_layer.weight"
        if saved_layer in adapter.tensors:  # peft saved the (embedding) layer beside its LoRA; loading puts it back
            _replace(slot, adapter.take(saved_layer))
        slot.deltas.append(Delta(module, embedding, a, b, float(layer.scaling["default"])))


def _lora_config(adapter_dir: Path) -> Any:
    """peft's LoraConfig of the adapter, once every key that changes the merge has its default."""
    from peft import LoraConfig

    raw = json.loads((adapter_dir / "adapter_config.json").read_text())
    defaults = {f.name: f.default for f in fields(LoraConfig) if not callable(f.default_factory)}
    defaults |= {f.name: f.default_factory() for f in fields(LoraConfig) if callable(f.default_factory)}
    for key, value in sorted(raw.items()):
        if key in _MERGE_NEUTRAL_KEYS:
            continue
        if key not in defaults:
            raise Unsupported(f"adapter_config.json: {key} is not a LoraConfig field of this peft")
        default = defaults[key]
        if value != default and not (value in (None, {}, [], False) and default in (None, {}, [], False)):
            raise Unsupported(f"adapter_config.json: {key} = {json.dumps(value)}")
    with loading(adapter_dir, "the adapter config"):
        return LoraConfig.from_pretrained(adapter_dir)


def _inject(lora_config: Any, skeleton: Any) -> tuple[list[tuple[str, Any, bool]], list[tuple[str, Any]]]:
    """peft's LoRA layers on the skeleton: ([(module, layer, is_embedding)], [(module, modules_to_save wrapper)])."""
    import torch.nn as nn
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Embedding, Linear
    from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    try:
        inject_adapter_in_model(lora_config, skeleton, adapter_name="default", low_cpu_mem_usage=True)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise Unsupported(f"peft cannot place it on a skeleton of the model ({type(e).__name__}: {e})") from None
    layers, saved = [], []
    for name, module in skeleton.named_modules():
        if isinstance(module, LoraLayer):
            kind = type(module)
            base = type(module.get_base_layer())
            if kind not in (Linear, Embedding) or base not in (nn.Linear, nn.Embedding):
                raise Unsupported(f"LoRA on {name}, a {base.__name__} ({kind.__module__}.{kind.__name__})")
            variant = module.lora_variant.get("default")
            if variant is not None or module.use_dora.get("default"):
                raise Unsupported(f"{name}: a LoRA variant ({type(variant).__name__ if variant else 'DoRA'})")
            if getattr(module, "fan_in_fan_out", False) or module.lora_bias.get("default"):
                raise Unsupported(f"{name}: fan_in_fan_out or lora_bias")
            layers.append((name, module, kind is Embedding))
        elif isinstance(module, ModulesToSaveWrapper):
            saved.append((name, module))
        elif isinstance(module, AuxiliaryTrainingWrapper):
            raise Unsupported(f"{name}: {type(module).__name__} (trainable tokens)")
    for name, _, _ in layers:
        if any(name == m or name.startswith(m + ".") for m, _ in saved):
            raise Unsupported(f"{name}: LoRA inside a modules_to_save module")
    return layers, saved


def _nf4_weights(skeleton: Any) -> set[str]:
    """Names of the weights transformers stores in 4 bits when it loads the model with nf4.quant_config:
    its own choice (every ``nn.Linear`` except the output embedding, tied and fp32-kept modules)."""
    import torch.nn as nn
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(skeleton, None, skeleton._keep_in_fp32_modules)
    return {
        f"{name}.weight"
        for name, module in skeleton.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, skip)
    }


def _base_tensors(model_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of the base's shards; shards named by an index must all be there."""
    out: dict[str, StoredTensor] = {}
    for path in weight_files(model_dir):
        out.update(stored_tensors(path))
    return out


def _replace(slot: Slot, source: StoredTensor) -> None:
    """``slot`` starts from an adapter tensor; two different ones for one tensor are peft's call."""
    if slot.replaced and slot.source != source and not _same_values(slot.source, source):
        raise Unsupported(f"two different adapter tensors replace {slot.name}")
    if tuple(source.shape) != tuple(slot.source.shape):
        raise Unsupported(
            f"adapter tensor {source.name} is {list(source.shape)}, {slot.name} {list(slot.source.shape)}"
        )
    slot.source, slot.replaced = source, True


def _same_values(a: StoredTensor, b: StoredTensor) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(read_tensor(a).float(), read_tensor(b).float())


def write(p: Plan, out_dir: Path, nf4_dtype: str | None = None, max_shard_bytes: int | None = None) -> list[str]:
    """Write the merged weights of ``p`` into ``out_dir`` (fp32 shards); ``nf4_dtype``: the compute
    dtype of the NF4 base whose dequantized weights stand in for the 4-bit linears (``dequant``; the
    plan must have been made with ``nf4=True``).
    Raises ModelError naming the first tensor that is not finite. Returns the shard file names."""
    by_name = {s.name: s for s in p.slots}
    entries = [OutTensor(s.name, s.out_dtype, tuple(s.source.shape)) for s in p.slots]

    def produce(t: OutTensor) -> Any:
        return _merged(by_name[t.name], p.adapter_dir, nf4_dtype)

    return write_shards(out_dir, entries, produce, max_shard_bytes or MAX_SHARD_BYTES)


def _merged(slot: Slot, adapter_dir: Path, nf4_dtype: str | None) -> Any:
    """One output tensor: source → fp32 (→ NF4 round trip) + every delta, checked finite.
    At most one fp32 copy of the tensor and a few blocks of rows exist at a time (NF4: its copies)."""
    import torch

    if slot.source.dtype not in FLOAT_DTYPES:
        return read_tensor(slot.source)
    if nf4_dtype is not None and slot.nf4:
        w = nf4_round_trip(read_tensor(slot.source, getattr(torch, nf4_dtype)), nf4_dtype).to(torch.float32)
    else:
        w = read_tensor(slot.source, torch.float32)
    for delta in slot.deltas:
        _add_delta(w, delta)
    flat, step = w.view(-1), DELTA_BLOCK_BYTES // 4
    # in blocks: isfinite of a whole tensor allocates its abs() (a second fp32 copy) and two masks
    if not all(torch.isfinite(flat[i : i + step]).all() for i in range(0, flat.numel(), step)):
        raise ModelError(f"{adapter_dir}: merged weights are not finite in {slot.name}; the adapter is broken")
    return w


def _add_delta(w: Any, d: Delta) -> None:
    """``w += (B @ A) * scale`` (embedding: ``(B @ A).T * scale``), in fp32, a block of rows at a time.

    The arithmetic of peft's ``get_delta_weight`` + ``merge``: each element is an r-term dot product,
    scaled, then added. One block (every tensor under 64 MB) gives peft's values bit for bit; BLAS may
    compute a narrower block's products with other kernels, a few fp32 ulps apart (tested at 1e-6)."""
    import torch

    a, b = read_tensor(d.a, torch.float32), read_tensor(d.b, torch.float32)
    rows = max(1, DELTA_BLOCK_BYTES // (4 * w.shape[1]))
    for i in range(0, w.shape[0], rows):
        block = (b @ a[:, i : i + rows]).T if d.embedding else b[i : i + rows] @ a
        w[i : i + rows] += block.mul_(d.scale)


def nf4_round_trip(w: Any, compute_dtype: str) -> Any:
    """dequantize(NF4(w)) in ``compute_dtype``, as :func:`edgeft.nf4.load_dequantized` has it: ``w`` cast
    to the compute dtype, quantized the way transformers does on load (a ``Params4bit`` with the
    settings of :func:`edgeft.nf4.quant_config`, moved to the CPU), dequantized by bitsandbytes."""
    import bitsandbytes as bnb
    import torch

    require_bitsandbytes()
    cfg = quant_config(compute_dtype)
    param = bnb.nn.Params4bit(
        w.to(getattr(torch, compute_dtype)),
        requires_grad=False,
        compress_statistics=cfg.bnb_4bit_use_double_quant,
        quant_type=cfg.bnb_4bit_quant_type,
        quant_storage=cfg.bnb_4bit_quant_storage,
    ).to("cpu")
    return bnb.functional.dequantize_4bit(param.data, param.quant_state)
