"""Stage `merge`: fold a LoRA adapter into its fp32 base and write a plain Hugging Face folder.

The delta is computed and applied in fp32 by peft (``safe_merge`` checks it is finite before the
weights are changed); we check the merged weights once more before writing, because a broken adapter
must not become a shipped artifact.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .errors import ModelError
from .loading import loading
from .stage import StageOutput, content_hash, run_stage

# Tokenizer files travel with the merged model so the folder is self-contained.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def merge_adapter(model_dir: Path, adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write base + adapter as one fp32 safetensors model into ``out_dir``. Does not touch inputs."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with loading(model_dir, "the base model"):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with loading(adapter_dir, "the adapter"):
        model = PeftModel.from_pretrained(base, adapter_dir)
    with loading(adapter_dir, "the adapter (merge failed)"):
        merged = model.merge_and_unload(safe_merge=True)
    bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelError(
            f"{adapter_dir}: merged weights are not finite in {bad[0]} (and {len(bad) - 1} more); the adapter is broken"
        )
    merged.save_pretrained(out_dir, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        for src_dir in (adapter_dir, model_dir):
            if (Path(src_dir) / name).is_file():
                shutil.copy2(Path(src_dir) / name, Path(out_dir) / name)
                break
    if (Path(model_dir) / "generation_config.json").is_file():
        shutil.copy2(Path(model_dir) / "generation_config.json", Path(out_dir) / "generation_config.json")
    return {"parameters": sum(p.numel() for p in merged.parameters())}


def merge(model_dir: Path, adapter_dir: Path, out_dir: Path) -> StageOutput:
    """Cached stage; the adapter is checked against the base model's shapes before anything loads."""
    from .adapters import check_adapter
    from .models import architecture_of, check_model_dir

    config = check_model_dir(model_dir)
    check_adapter(adapter_dir, config, architecture_of(config))
    inputs = {"model": content_hash(model_dir), "adapter": content_hash(adapter_dir)}
    return run_stage(
        out_dir, "merge", inputs, {"dtype": "float32"}, lambda tmp: merge_adapter(model_dir, adapter_dir, tmp)
    )
