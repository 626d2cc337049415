"""Stage `merge`: fold a LoRA adapter into a full-precision base and write a plain Hugging Face folder.

Which base, for a QLoRA adapter (``strategy``):

- ``fp``: the original full-precision weights (what a LoRA adapter was trained against);
- ``dequant``: the NF4-dequantized weights, the ones a QLoRA adapter was trained against, so the
  merged model computes what the trained model computed;
- ``auto``: both, each measured by mean KL divergence against the adapter on the 4-bit base (the
  model as trained) over the held-out conversations; the closer one is written and the choice and
  both figures go into the manifest. For an adapter edgeft trained with ``method = 'lora'``, ``auto``
  is ``fp`` (there is no 4-bit base to compare with) and ``dequant`` is refused.

How (``results["path"]`` in the manifest):

- ``streaming`` (:mod:`edgeft.merge_stream`): one tensor at a time from the base's shards to the
  output's, the delta computed in fp32 and each merged tensor checked finite before it is written;
  memory is the interpreter and torch plus a few times the largest tensor, whatever the model's size;
- ``peft (full load): <reason>``: adapters the streaming merge does not reproduce exactly (DoRA,
  LoRA biases, trainable tokens, ...; the reason says which) are folded as before, the whole base in
  fp32 torch and peft's ``merge_and_unload(safe_merge=True)``: about 8 bytes a parameter at the peak.

The merged model is written in fp32 whatever the base's dtype (a bf16 base takes twice its size on
disk: 32 GB for an 8B). It is the full-precision reference every artifact is measured against and
the exporters' input; rounding it to bf16 would drop most of the adapter's delta on the way (a delta
under 1/256 of a weight does not move a bf16 value) and put the NF4 values of ``dequant`` off their
grid, so the reference would no longer compute what the adapter computes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from . import merge_stream
from .adapters import check_adapter
from .data import load_jsonl
from .errors import ConfigError, ModelError
from .loading import loading
from .models import architecture_of, check_model_dir
from .nf4 import adapter_on_nf4, load_dequantized
from .stage import StageOutput, content_hash, read_manifest, run_stage

STRATEGIES = ("fp", "dequant", "auto")
MAX_KLD_TOKENS = 512  # per held-out conversation

# Tokenizer files travel with the merged model so the folder is self-contained.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def trained_on(adapter_dir: Path) -> tuple[str | None, str]:
    """(method, compute dtype) an adapter was trained with, from the manifest edgeft's train stage
    wrote into it; (None, "float32") for an adapter trained elsewhere."""
    manifest = read_manifest(adapter_dir) or {}
    if manifest.get("stage") != "train":
        return None, "float32"
    return manifest.get("params", {}).get("method"), manifest.get("results", {}).get("compute_dtype", "float32")


def check_strategy(strategy: str, adapter_dir: Path, eval_file: Path | None, option: str = "[merge].strategy") -> str:
    """The strategy that will run: ``auto`` of a LoRA adapter is ``fp``; ``dequant`` of one is an error."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"{option}: expected one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    method, _ = trained_on(adapter_dir)
    if method == "lora":
        if strategy == "dequant":
            raise ConfigError(
                f"{option} = 'dequant': {adapter_dir} was trained with method = 'lora' on the full-precision base; "
                "only 'fp' applies to it"
            )
        return "fp"
    if strategy == "auto" and eval_file is None:
        raise ConfigError(f"{option} = 'auto' measures on held-out conversations: give --eval (or [data].eval)")
    return strategy


def _fold(base: Any, adapter_dir: Path) -> Any:
    """base + adapter as one model (mutates ``base``); refuses non-finite merged weights."""
    import torch
    from peft import PeftModel

    with loading(adapter_dir, "the adapter"):
        model = PeftModel.from_pretrained(base, adapter_dir)
    with loading(adapter_dir, "the adapter (merge failed)"):
        merged = model.merge_and_unload(safe_merge=True)
    bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelError(
            f"{adapter_dir}: merged weights are not finite in {bad[0]} (and {len(bad) - 1} more); the adapter is broken"
        )
    return merged


def _fp_base(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with loading(model_dir, "the base model"):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def held_out_sequences(tokenizer: Any, eval_file: Path) -> list[list[int]]:
    """Token ids of each held-out conversation (chat template, answer included), at most MAX_KLD_TOKENS."""
    out = []
    for ex in load_jsonl(eval_file):
        ids = tokenizer.apply_chat_template(ex.messages, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        out.append(ids[:MAX_KLD_TOKENS])
    return out


def mean_kld(teacher: Any, candidates: dict[str, Any], sequences: list[list[int]]) -> dict[str, float]:
    """Mean over all token positions of KL(teacher ‖ candidate) of the next-token distributions, in fp32."""
    import torch

    total = dict.fromkeys(candidates, 0.0)
    n = 0
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            p = torch.log_softmax(teacher(x).logits[0].float(), -1)
            for name, model in candidates.items():
                q = torch.log_softmax(model(x).logits[0].float(), -1)
                total[name] += float((p.exp() * (p - q)).sum(-1).clamp_min(0).sum())
            n += len(ids)
    return {name: t / n for name, t in total.items()}


def compare_merges(
    model_dir: Path, adapter_dir: Path, eval_file: Path, merged: dict[str, Path]
) -> tuple[dict[str, float], list[list[int]]]:
    """Mean KLD of each written merge (``{strategy: folder}``) against the adapter on the NF4 base.

    One candidate is loaded at a time, beside the NF4 teacher: the peak is one fp32 model (4 bytes a
    parameter) plus the teacher (its 4-bit linears, about 0.6 bytes a parameter, and its embedding and
    head in the compute dtype) plus the logits of one conversation; the teacher's forward passes run
    once per candidate. Returns ({strategy: mean KLD}, the token sequences measured on).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, dtype = trained_on(adapter_dir)
    teacher = adapter_on_nf4(model_dir, adapter_dir, dtype).eval()
    with loading(model_dir, "the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sequences = held_out_sequences(tokenizer, eval_file)
    kld = {}
    for name, folder in merged.items():
        with loading(folder, f"the {name} merge"):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        kld.update(mean_kld(teacher, {name: model}, sequences))
        del model
    return kld, sequences


def merge_adapter(
    model_dir: Path, adapter_dir: Path, out_dir: Path, strategy: str = "fp", eval_file: Path | None = None
) -> dict[str, Any]:
    """Write base + adapter as one fp32 safetensors model into ``out_dir``. Does not touch inputs.

    ``auto`` writes both merges into scratch folders inside ``out_dir`` (twice the model on disk for
    a while), measures them one at a time and keeps the closer one."""
    out_dir = Path(out_dir)
    _, dtype = trained_on(adapter_dir)
    results: dict[str, Any] = {"strategy": strategy}
    try:
        plan = merge_stream.plan(model_dir, adapter_dir, nf4=strategy != "fp")
        results["path"] = "streaming"
    except merge_stream.Unsupported as e:
        plan = None
        results["path"] = f"peft (full load): {e}"
    if strategy == "auto":
        scratch = {s: out_dir / f".merge-{s}" for s in ("fp", "dequant")}
        for s, folder in scratch.items():
            folder.mkdir()
            parameters = _write_merge(plan, model_dir, adapter_dir, folder, s, dtype)
        kld, sequences = compare_merges(model_dir, adapter_dir, eval_file, scratch)
        chosen = min(kld, key=kld.get)
        for f in scratch[chosen].iterdir():
            f.rename(out_dir / f.name)
        for folder in scratch.values():
            shutil.rmtree(folder)
        results.update(
            strategy=chosen,
            requested="auto",
            kld_vs_adapter_on_nf4_base={k: round(v, 8) for k, v in kld.items()},
            kld_tokens=sum(map(len, sequences)),
            kld_conversations=len(sequences),
        )
    else:
        parameters = _write_merge(plan, model_dir, adapter_dir, out_dir, strategy, dtype)
    results["compute_dtype"] = dtype if strategy != "fp" else None
    results["parameters"] = parameters
    results["shards"] = len(list(out_dir.glob("*.safetensors")))
    return results


def _write_merge(plan: Any, model_dir: Path, adapter_dir: Path, out_dir: Path, strategy: str, dtype: str) -> int:
    """One strategy's merge into ``out_dir``, streamed when there is a plan, else through peft; returns
    the number of parameters written."""
    if plan is not None:
        merge_stream.write(plan, out_dir, dtype if strategy == "dequant" else None)
        _write_side_files(plan.config, model_dir, adapter_dir, out_dir)
        return plan.parameters
    merged = _fold(_fp_base(model_dir) if strategy == "fp" else load_dequantized(model_dir, dtype), adapter_dir)
    save_merged(merged, model_dir, adapter_dir, out_dir)
    return sum(p.numel() for p in merged.parameters())


def save_merged(merged: Any, model_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    """A self-contained HF folder: safetensors weights, tokenizer files, generation config."""
    merged.save_pretrained(out_dir, safe_serialization=True)
    _copy_side_files(model_dir, adapter_dir, out_dir)


def _write_side_files(config: Any, model_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    """What ``save_pretrained`` writes beside the weights (config.json, generation_config.json), and the
    tokenizer files, for a streamed merge."""
    from transformers import GenerationConfig

    config.save_pretrained(out_dir)
    if not (Path(model_dir) / "generation_config.json").is_file():  # the one from_pretrained derives
        with loading(model_dir, "the generation config"):
            derived = GenerationConfig.from_pretrained(
                model_dir, config_file_name="config.json", _from_model_config=True
            )
        derived.save_pretrained(out_dir)
    _copy_side_files(model_dir, adapter_dir, out_dir)


def _copy_side_files(model_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    for name in _TOKENIZER_FILES:
        for src_dir in (adapter_dir, model_dir):
            if (Path(src_dir) / name).is_file():
                shutil.copy2(Path(src_dir) / name, Path(out_dir) / name)
                break
    if (Path(model_dir) / "generation_config.json").is_file():
        shutil.copy2(Path(model_dir) / "generation_config.json", Path(out_dir) / "generation_config.json")


def merge(
    model_dir: Path, adapter_dir: Path, out_dir: Path, strategy: str = "fp", eval_file: Path | None = None
) -> StageOutput:
    """Cached stage; the adapter is checked against the base model's shapes before anything loads."""
    config = check_model_dir(model_dir)
    check_adapter(adapter_dir, config, architecture_of(config))
    strategy = check_strategy(strategy, adapter_dir, eval_file)
    inputs = {"model": content_hash(model_dir), "adapter": content_hash(adapter_dir)}
    if strategy == "auto":
        inputs["eval"] = content_hash(eval_file)
    return run_stage(
        out_dir,
        "merge",
        inputs,
        {"dtype": "float32", "strategy": strategy},
        lambda tmp: merge_adapter(model_dir, adapter_dir, tmp, strategy, eval_file),
    )
