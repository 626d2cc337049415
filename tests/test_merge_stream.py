"""The streaming merge against peft's merge_and_unload, on tiny models: same tensors, same folder.

The reference for every case is what the merge stage did before streaming: the base loaded in fp32,
``PeftModel.from_pretrained(...).merge_and_unload(safe_merge=True)`` and ``save_pretrained``. On the
tiny models every delta is one block of rows, the same ``(B @ A) * scale`` peft computes, so the
tensors must be equal bit for bit (not within a tolerance).
"""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .tiny import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Safe temp for pork?", "How long do I boil an egg? 7 or 12 minutes", "  indented\n\tcode 1234"]
# merged model (from_pretrained of the folder) vs the unmerged PeftModel: fp32, a few layers
LOGITS_ATOL = 2e-4
# streamed in blocks of a few rows vs peft in one product: max |diff| / max |weight|, a few fp32 ulps
BLOCKED_MAX_ERROR = 1e-6


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Tiny llamas: tied head, untied head, and an untied one saved in bf16 in 4 MB shards without a
    generation_config.json (the merge derives one as from_pretrained does)."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bases")
    out = {
        "tied": make_tiny_llama(root / "tied", tokenizer, seed=1),
        "untied": make_tiny_llama(root / "untied", tokenizer, tied=False, seed=2),
    }
    model = AutoModelForCausalLM.from_pretrained(out["untied"], dtype=torch.bfloat16)
    model.save_pretrained(root / "sharded", max_shard_size="4MB")
    tokenizer.save_pretrained(root / "sharded")
    (root / "sharded" / "generation_config.json").unlink()
    out["sharded"] = root / "sharded"
    return out


def make_adapter(base: Path, folder: Path, seed: int, adapter_dtype: str = "float32", **lora) -> Path:
    """A peft adapter on ``base`` with every trainable tensor random (std 0.2), saved the peft way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder)
    if adapter_dtype != "float32":
        path = folder / "adapter_model.safetensors"
        tensors = {k: v.to(getattr(torch, adapter_dtype)) for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    return folder


def peft_merge(base: Path, adapter: Path, out: Path, dequant: str | None = None) -> Path:
    """The reference: what merge_adapter did before streaming."""
    from edgeft.merge import _fold, _fp_base, save_merged
    from edgeft.nf4 import load_dequantized

    merged = _fold(load_dequantized(base, dequant) if dequant else _fp_base(base), adapter)
    save_merged(merged, base, adapter, out)
    return out


def read_folder(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def logits(model, tokenizer):
    import torch

    with torch.no_grad():
        return [model(torch.tensor([tokenizer(p)["input_ids"]])).logits[0] for p in PROMPTS]


# (case, base, LoraConfig keywords, adapter tensor dtype, unmerged peft model computes the merged one)
# Tied head LoRA: merging folds the head's delta into the one embedding tensor, so the merged model
# differs from the unmerged one by design (peft warns); only the merged reference applies there.
CASES = [
    ("all-seven-linears", "untied", dict(r=4, lora_alpha=8, target_modules=LINEARS), "float32", True),
    (
        "rslora-bf16-adapter",
        "untied",
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=LINEARS),
        "bfloat16",
        True,
    ),
    (
        "rank-and-alpha-pattern",
        "untied",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=LINEARS,
            rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
            alpha_pattern={"layers.1.self_attn.q_proj": 3, "v_proj": 16},
        ),
        "float32",
        True,
    ),
    ("lm-head-lora", "untied", dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]), "float32", True),
    (
        "embed-tokens-lora",
        "untied",
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"]),
        "float32",
        True,
    ),
    (
        "modules-to-save",
        "untied",
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]),
        "float32",
        True,
    ),
    ("tied-all-linears", "tied", dict(r=4, lora_alpha=8, target_modules=LINEARS), "float32", True),
    (
        "tied-head-and-embedding-lora",
        "tied",
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "o_proj"]),
        "float32",
        False,
    ),
    (
        "tied-head-in-modules-to-save",
        "tied",
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "float32",
        True,
    ),
    ("sharded-bf16-base", "sharded", dict(r=4, lora_alpha=8, target_modules=LINEARS), "float32", True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "base", "lora", "adapter_dtype", "unmerged_same"), CASES, ids=[c[0] for c in CASES])
def test_streaming_merge_is_peft_merge_and_unload_bit_for_bit(
    case, base, lora, adapter_dtype, unmerged_same, bases, tokenizer, tmp_path
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgeft.merge import merge

    base_dir = bases[base]
    adapter = make_adapter(base_dir, tmp_path / "adapter", seed=len(case), adapter_dtype=adapter_dtype, **lora)
    ref = peft_merge(base_dir, adapter, tmp_path / "peft")
    out = merge(base_dir, adapter, tmp_path / "stream")
    assert out.manifest["results"]["path"] == "streaming"

    ours, theirs = read_folder(out.path), read_folder(ref)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == torch.float32, name
        assert torch.equal(ours[name], theirs[name]), f"{name}: max diff {(ours[name] - theirs[name]).abs().max()}"
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out.path / name).read_text()) == json.loads((ref / name).read_text()), name
    weights = {"model.safetensors", "model.safetensors.index.json"}
    assert {p.name for p in ref.iterdir()} - weights <= {p.name for p in out.path.iterdir()}
    assert out.manifest["results"]["parameters"] == sum(v.numel() for v in theirs.values())

    flat = AutoModelForCausalLM.from_pretrained(out.path, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    for a, b in zip(logits(flat, tokenizer), logits(reference, tokenizer)):
        assert torch.equal(a, b)
    if unmerged_same:
        lora_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter
        )
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        for a, b, c in zip(logits(flat, tokenizer), logits(lora_model.eval(), tokenizer), logits(plain, tokenizer)):
            assert (b - c).abs().max() > 1e-3  # the adapter changes the model...
            torch.testing.assert_close(a, b, atol=LOGITS_ATOL, rtol=0)  # ...and the merged one computes that


@pytest.mark.slow
def test_blocks_of_rows_give_the_same_merge(bases, tmp_path, monkeypatch):
    """Real-size tensors are converted, folded and checked in blocks of rows; tiny ones fit one block.
    With blocks of a few rows (bf16 base, embedding and head LoRA) the result is peft's up to the last
    bits: BLAS computes a narrow block's r-term dot products with other kernels (measured: 1.3e-7)."""

    from edgeft import merge_stream, shards
    from edgeft.merge import merge

    monkeypatch.setattr(merge_stream, "DELTA_BLOCK_BYTES", 4 * 64 * 7)  # 7 rows of 64
    monkeypatch.setattr(shards, "READ_BLOCK_BYTES", 1000)  # 500 bf16 values: not a whole number of rows
    lora = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "down_proj"])
    adapter = make_adapter(bases["sharded"], tmp_path / "adapter", seed=9, **lora)
    ours = read_folder(merge(bases["sharded"], adapter, tmp_path / "stream").path)
    ref = read_folder(peft_merge(bases["sharded"], adapter, tmp_path / "peft"))
    assert sorted(ours) == sorted(ref)
    for name in ref:
        err = float((ours[name] - ref[name]).abs().max() / ref[name].abs().max())
        assert err <= BLOCKED_MAX_ERROR, (name, err)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma3", "phi3"])
def test_every_family_streams_to_peft_merge_bit_for_bit(family, tokenizer, tmp_path):
    """Every decoder linear of each family (qwen2's q/k/v biases, phi3's fused qkv and gate_up)."""
    import torch
    from transformers import AutoConfig

    from edgeft.merge import merge
    from edgeft.models import LAYER_LINEARS

    from .tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "base", tokenizer, family, seed=8)
    linears = list(
        LAYER_LINEARS[AutoConfig.from_pretrained(base).architectures[0]](json.loads((base / "config.json").read_text()))
    )
    adapter = make_adapter(base, tmp_path / "adapter", seed=8, r=4, lora_alpha=8, target_modules=linears)
    out = merge(base, adapter, tmp_path / "stream")
    assert out.manifest["results"]["path"] == "streaming"
    ours, ref = read_folder(out.path), read_folder(peft_merge(base, adapter, tmp_path / "peft"))
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert json.loads((out.path / "config.json").read_text()) == json.loads(
        (tmp_path / "peft" / "config.json").read_text()
    )


@pytest.mark.slow
def test_a_sharded_merge_is_read_by_transformers_and_the_gguf_exporter(bases, tmp_path, monkeypatch):
    """Small shards: an index and several files, which weights.weight_files and the GGUF export read."""
    from edgeft import merge_stream
    from edgeft.formats.gguf.export import export
    from edgeft.merge import merge
    from edgeft.weights import weight_files

    monkeypatch.setattr(merge_stream, "MAX_SHARD_BYTES", 3 << 20)
    adapter = make_adapter(bases["untied"], tmp_path / "adapter", seed=3, r=4, lora_alpha=8, target_modules=LINEARS)
    out = merge(bases["untied"], adapter, tmp_path / "merged")
    files = weight_files(out.path)
    assert out.manifest["results"]["shards"] == len(files) > 2
    assert (out.path / "model.safetensors.index.json").is_file() and not (out.path / "model.safetensors").exists()
    ref = read_folder(peft_merge(bases["untied"], adapter, tmp_path / "peft"))
    ours = read_folder(out.path)
    assert sorted(ours) == sorted(ref) and all((ours[k] == ref[k]).all() for k in ref)
    gguf = export(out.path, tmp_path / "gguf", "f32")
    assert gguf.manifest["results"]["n_tensors"] == len(ref)


@pytest.fixture(scope="module")
def qlora(bases, tmp_path_factory) -> Path:
    """A random adapter marked as trained by edgeft with method = 'qlora' in bf16."""
    folder = make_adapter(
        bases["tied"], tmp_path_factory.mktemp("qlora") / "adapter", seed=7, r=4, lora_alpha=8, target_modules=LINEARS
    )
    manifest = {"stage": "train", "params": {"method": "qlora"}, "results": {"compute_dtype": "bfloat16"}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(("family", "dtype"), [("llama", "float32"), ("llama", "bfloat16"), ("qwen2", "bfloat16")])
def test_per_tensor_nf4_round_trip_is_load_dequantized_bit_for_bit(family, dtype, tokenizer, tmp_path):
    """Same quantized set as transformers' NF4 load, and the same dequantized values, tensor for tensor."""
    import bitsandbytes as bnb
    import torch

    from edgeft import merge_stream
    from edgeft.nf4 import load_dequantized, load_nf4
    from edgeft.shards import read_tensor

    from .tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "base", tokenizer, family, seed=5)
    adapter = make_adapter(base, tmp_path / "adapter", seed=5, r=2, lora_alpha=2, target_modules=["q_proj"])
    plan = merge_stream.plan(base, adapter, nf4=True)
    four_bit = {f"{n}.weight" for n, m in load_nf4(base, dtype).named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert {s.name for s in plan.slots if s.nf4} == four_bit and len(four_bit) == 7 * 2
    reference = dict(load_dequantized(base, dtype).named_parameters())
    for slot in plan.slots:
        w = read_tensor(slot.source)
        ours = merge_stream.nf4_round_trip(w, dtype).float() if slot.nf4 else w.float()
        assert torch.equal(ours, reference[slot.name]), slot.name
        if slot.nf4:
            assert not torch.equal(ours, w.float())  # it did round


def test_dequant_merge_streams_the_nf4_base_plus_the_delta(bases, qlora, tmp_path):
    import torch

    from edgeft.merge import merge

    out = merge(bases["tied"], qlora, tmp_path / "merged", "dequant")
    results = out.manifest["results"]
    assert (
        results["path"] == "streaming" and results["strategy"] == "dequant" and results["compute_dtype"] == "bfloat16"
    )
    ours, ref = read_folder(out.path), read_folder(peft_merge(bases["tied"], qlora, tmp_path / "peft", "bfloat16"))
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name


# (case, LoraConfig keywords, start of the reason in the manifest). check_adapter refuses DoRA's
# magnitude vectors before a merge starts, so DoRA is merged through merge_adapter directly.
FALLBACKS = [
    (
        "trainable-tokens",
        dict(target_modules=["q_proj"], trainable_token_indices=[1, 5, 9]),
        "trainable_token_indices = [1, 5, 9]",
    ),
    ("dora", dict(target_modules=["q_proj", "v_proj"], use_dora=True), "use_dora = true"),
]


@pytest.mark.parametrize(("case", "lora", "reason"), FALLBACKS, ids=[c[0] for c in FALLBACKS])
def test_an_adapter_streaming_does_not_cover_goes_through_peft_and_says_why(case, lora, reason, bases, tmp_path):
    import torch

    from edgeft.merge import merge, merge_adapter

    adapter = make_adapter(bases["untied"], tmp_path / "adapter", seed=4, r=4, lora_alpha=8, **lora)
    out = tmp_path / "merged"
    if case == "dora":
        out.mkdir()
        results = merge_adapter(bases["untied"], adapter, out)
    else:
        results = merge(bases["untied"], adapter, out).manifest["results"]
    assert results["path"] == f"peft (full load): adapter_config.json: {reason}"
    ours, ref = read_folder(out), read_folder(peft_merge(bases["untied"], adapter, tmp_path / "peft"))
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    changed = "model.layers.0.self_attn.q_proj.weight" if case == "dora" else "model.embed_tokens.weight"
    assert not torch.equal(ours[changed], read_folder(bases["untied"])[changed])  # the adapter did something


def test_an_adapter_missing_a_targeted_module_is_refused_not_merged_without_it(bases, tmp_path):
    """peft would load the rest and leave the module as initialised (no delta, a warning at most)."""
    from safetensors.torch import load_file, save_file

    from edgeft.errors import ModelError
    from edgeft.merge import merge

    adapter = make_adapter(bases["untied"], tmp_path / "adapter", seed=5, r=4, lora_alpha=8, target_modules=LINEARS)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"has no base_model\.model\.model\.layers\.1\.mlp\.up_proj\.lora_B\.weight"):
        merge(bases["untied"], adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_adapter_whose_merge_overflows_is_refused_and_nothing_is_written(bases, tmp_path):
    """Finite A and B (check_adapter passes) whose product is not: exit 2, one line naming the tensor."""
    import torch
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from edgeft.cli import cli

    adapter = make_adapter(bases["untied"], tmp_path / "adapter", seed=6, r=4, lora_alpha=8, target_modules=LINEARS)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    for ab in "AB":
        tensors[f"base_model.model.model.layers.1.mlp.up_proj.lora_{ab}.weight"].fill_(1e30)
    save_file(tensors, path, metadata={"format": "pt"})
    assert all(torch.isfinite(t).all() for t in tensors.values())

    result = CliRunner().invoke(
        cli, ["merge", "--model", str(bases["untied"]), "--adapter", str(adapter), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("edgeft: error:")]
    assert len(errors) == 1 and "merged weights are not finite in model.layers.1.mlp.up_proj.weight" in errors[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


# The memory check runs in a child process: an untied llama of 32 layers, 29 M parameters in bf16
# (116 MB once fp32), whose largest tensors (embedding, head) are 8 MB in fp32. The child merges a
# tiny model first (imports, the meta skeleton, peft: the baseline), then the big one, and reports its
# peak RSS after each.
_MEMORY_CHILD = """
import json, resource, sys
from pathlib import Path
from edgeft.merge import merge
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
tiny, big, out = map(Path, sys.argv[1:4])
merge(tiny / "model", tiny / "adapter", out / "tiny")
before = peak()
merge(big / "model", big / "adapter", out / "big")
print(json.dumps({"baseline": before, "peak": peak()}))
"""


@pytest.mark.slow
def test_merge_memory_does_not_grow_with_the_model(tmp_path):
    """Peak RSS over the baseline stays under 3 x the largest fp32 tensor (+ 16 MB of slack), and under
    a third of the model in fp32: a merge that held the model would not fit. Not a timing."""
    script = importlib.machinery.SourceFileLoader("make_random_model", str(ROOT / "scripts" / "make-random-model"))
    mrm = script.load_module()
    shapes = {  # llama-3 layout (the 8b preset's), untied head
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=1000, head_dim=16),
        "big": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=32, vocab_size=8000, head_dim=32),
    }
    facts = {}
    for name, shape in shapes.items():
        config = mrm.make_config(
            {**mrm.PRESETS["8b"], **shape, "num_attention_heads": 8, "num_key_value_heads": 4}, "bfloat16", None
        )
        facts[name] = mrm.write_model(tmp_path / name / "model", config, "bfloat16", shard_mb=32)
        mrm.write_adapter(tmp_path / name / "adapter", config, r=16, alpha=32)
    fp32_bytes, largest = 4 * facts["big"]["parameters"], 2 * facts["big"]["largest_bytes"]
    assert fp32_bytes > 110e6 and largest < 9e6

    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "tiny"), str(tmp_path / "big"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    grew = rss["peak"] - rss["baseline"]
    assert grew < 3 * largest + (16 << 20), (grew, facts["big"])
    assert grew < fp32_bytes / 3, (grew, facts["big"])
    assert len(list((tmp_path / "out" / "big").glob("*.safetensors"))) == 1  # 116 MB: one shard
    shutil.rmtree(tmp_path / "out")
