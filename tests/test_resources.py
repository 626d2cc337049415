"""The resource plan (estimated RAM and disk per stage, from headers alone) and the measured peak RSS
per stage that the report puts beside it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from edgeft import resources
from edgeft.config import load_config
from edgeft.errors import ConfigError
from edgeft.targets import parse_target_list

from .cli import run_edgeft
from .hostile import assert_refused
from .tiny import tiny_build_config

# Llama-3.1-8B's shapes (config.json of meta-llama/Llama-3.1-8B): 8.03 B parameters.
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}


def sparse_llama(folder: Path, config: dict, dtype: str = "BF16") -> Path:
    """A model folder whose safetensors files have real headers and holes for data: 16 GB on paper,
    a few kilobytes on disk (the plan reads headers only)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    h, inter, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"]
    head_dim = h // config["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": [config["vocab_size"], h], "lm_head.weight": [config["vocab_size"], h]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": [h, h],
            p + "self_attn.k_proj.weight": [kv * head_dim, h],
            p + "self_attn.v_proj.weight": [kv * head_dim, h],
            p + "self_attn.o_proj.weight": [h, h],
            p + "mlp.gate_proj.weight": [inter, h],
            p + "mlp.up_proj.weight": [inter, h],
            p + "mlp.down_proj.weight": [h, inter],
            p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
        }
    shapes["model.norm.weight"] = [h]
    size = {"BF16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = size
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # a hole: no data blocks are written
    return folder


def test_shape_of_an_8b_model_from_headers_alone(tmp_path: Path) -> None:
    shape = resources.shape_from_safetensors(sparse_llama(tmp_path / "llama8b", LLAMA_8B))
    assert shape.parameters == 8_030_261_248  # Llama-3.1-8B's published count
    assert shape.largest_tensor == 128256 * 4096
    assert (shape.layers, shape.hidden, shape.vocab) == (32, 4096, 128256)


def test_an_8b_build_is_refused_on_24_gb_naming_the_stage_and_numbers(tmp_path: Path, monkeypatch) -> None:
    """The fp32 stages of an 8B model (32 GB a copy) cannot fit 24 GB: refused with the numbers."""
    monkeypatch.setenv("EDGEFT_RAM_BYTES", str(24 * 2**30))
    shape = resources.shape_from_safetensors(sparse_llama(tmp_path / "llama8b", LLAMA_8B))
    cfg = load_config(None)
    plan = resources.plan(cfg, parse_target_list("gguf-q4"), tmp_path / "out", shape)
    by_stage = {s.stage: s for s in plan.stages}
    assert by_stage["model"].peak_ram > 32e9  # the built-in's fp32 copy of 8.03 B parameters
    assert by_stage["reference"].peak_ram > 16e9  # one bf16 copy: an fp32 one would not fit
    assert by_stage["export"].peak_ram < 8e9  # tensor by tensor: the largest tensor, not the model
    with pytest.raises(ConfigError) as err:
        resources.check_fits(plan, "edgeft.toml")
    message = str(err.value)
    assert f"stage {plan.peak.stage} needs about" in message and "this machine has 25.8 GB" in message
    assert "8.03 B parameters" in message


def test_a_small_model_fits_and_the_disk_adds_up(tmp_path: Path, smollm2_dir: Path) -> None:
    shape = resources.shape_from_safetensors(smollm2_dir)
    assert 134e6 < shape.parameters < 136e6
    cfg = load_config(None)
    plan = resources.plan(cfg, parse_target_list("gguf-q8,gguf-q4"), tmp_path / "out", shape)
    resources.check_fits(plan, "edgeft.toml")  # fits any machine that runs the tests
    assert plan.disk == sum(s.disk for s in plan.stages)
    assert [s.stage for s in plan.stages].count("export") == 1  # the shared F32 export counts once


# ------------------------------------------------------------------------------- reference precision
# An 8B model trained on a GPU: the host holds only what the torch passes need. One fp32 copy for
# them is 0.9 + 32.1 = 33.0 GB, a bf16 copy 0.9 + 16.1 = 17.0 GB; every other stage stays under 8 GB.


def _gpu_8b_plan(tmp_path: Path, monkeypatch, ram: int, dtype: str = "auto", ladder_export: bool = False):
    monkeypatch.setenv("EDGEFT_RAM_BYTES", str(ram))
    monkeypatch.setenv("EDGEFT_DISK_FREE_BYTES", str(10**12))
    cfg = load_config(None)
    cfg.model = str(sparse_llama(tmp_path / "llama8b", LLAMA_8B))
    cfg.train.device, cfg.bench.ladder_export, cfg.bench.reference_dtype = "cuda", ladder_export, dtype
    return resources.plan(cfg, parse_target_list("gguf-q4"), tmp_path / "out")


def test_the_reference_is_computed_in_bf16_where_its_fp32_copy_would_not_fit(tmp_path: Path, monkeypatch) -> None:
    plan = _gpu_8b_plan(tmp_path, monkeypatch, 24 * 2**30)  # 25.8 GB: 23.2 GB usable
    by_stage = {s.stage: s for s in plan.stages}
    assert plan.reference_dtype.name == "bfloat16"
    assert plan.reference_dtype.why == "fp32 would need 33.0 GB, this machine has 25.8 GB"
    for stage in ("reference", "bench-base"):  # the base model's torch pass runs in the same dtype
        assert 16.9e9 < by_stage[stage].peak_ram < 17.0e9
        assert by_stage[stage].basis == "one bf16 copy for torch, fp32 would need 33.0 GB"
    assert plan.peak.stage == "reference"
    resources.check_fits(plan, "edgeft.toml")  # fits: the build goes ahead
    assert plan.to_dict()["reference_dtype"] == {"name": "bfloat16", "why": plan.reference_dtype.why}
    assert "reference and bench-base computed in bf16 (fp32 would need 33.0 GB" in resources.render(plan)


def test_a_reference_that_fits_in_neither_dtype_is_refused_with_both_estimates(tmp_path: Path, monkeypatch) -> None:
    plan = _gpu_8b_plan(tmp_path, monkeypatch, 16 * 2**30)  # 17.2 GB: 15.5 GB usable
    with pytest.raises(ConfigError) as err:
        resources.check_fits(plan, "edgeft.toml")
    assert str(err.value) == (
        "edgeft.toml: stage reference needs about 17.0 GB of RAM (one bf16 copy for torch, fp32 would need "
        "33.0 GB, 8.03 B parameters); this machine has 17.2 GB; use a machine with more memory"
    )


def test_fp32_where_it_fits_and_a_forced_dtype_is_kept_either_way(tmp_path: Path, monkeypatch) -> None:
    roomy = _gpu_8b_plan(tmp_path / "a", monkeypatch, 64 * 2**30)
    assert roomy.reference_dtype == resources.ReferenceDtype("float32", "")  # as before the option existed
    assert {s.stage: s.basis for s in roomy.stages}["reference"] == "one fp32 copy (torch forward passes)"
    assert "computed in" not in resources.render(roomy)
    forced = _gpu_8b_plan(tmp_path / "b", monkeypatch, 64 * 2**30, dtype="bfloat16")
    assert forced.reference_dtype == resources.ReferenceDtype("bfloat16", "[bench].reference_dtype = 'bfloat16'")
    fp32 = _gpu_8b_plan(tmp_path / "c", monkeypatch, 24 * 2**30, dtype="float32")
    with pytest.raises(ConfigError, match=r"stage reference needs about 33\.0 GB.*\[bench\]\.reference_dtype = 'auto'"):
        resources.check_fits(fp32, "edgeft.toml")


def test_the_f32_exports_ladder_row_is_refused_with_the_knob_that_drops_it(tmp_path: Path, monkeypatch) -> None:
    """With the default ladder_export the unquantized GGUF is benched whole: as big as an fp32 copy."""
    plan = _gpu_8b_plan(tmp_path, monkeypatch, 24 * 2**30, ladder_export=True)
    assert plan.reference_dtype.name == "bfloat16"
    with pytest.raises(ConfigError, match=r"stage bench gguf-f32 needs .*\[bench\]\.ladder_export = false"):
        resources.check_fits(plan, "edgeft.toml")


def test_dry_run_shows_the_reference_dtype_and_the_flag_forces_it(tmp_path: Path) -> None:
    model = sparse_llama(tmp_path / "llama8b", LLAMA_8B)
    cfg = tmp_path / "edgeft.toml"
    cfg.write_text(f'model = "{model}"\n[train]\ndevice = "cuda"\n[bench]\nladder_export = false\n')
    args = ["build", "--config", str(cfg), "--out", "out", "--dry-run"]
    env = {"EDGEFT_RAM_BYTES": str(24 * 2**30), "EDGEFT_DISK_FREE_BYTES": str(10**12)}
    dry = run_edgeft(args, tmp_path, env=env)
    assert dry.returncode == 0, dry.stderr
    shown = json.loads(dry.stdout)
    assert shown["config"]["bench"]["reference_dtype"] == "auto"
    assert shown["resources"]["reference_dtype"]["name"] == "bfloat16"
    assert "computed in bf16" in dry.stderr and "would refuse" not in dry.stderr
    forced = run_edgeft([*args, "--reference-dtype", "float32"], tmp_path, env=env)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["config"]["bench"]["reference_dtype"] == "float32"
    assert "would refuse: " in forced.stderr and "stage reference needs about 33.0 GB" in forced.stderr
    assert not (tmp_path / "out").exists()


def test_peak_rss_is_per_stage_not_the_largest_so_far() -> None:
    import numpy as np

    rss = resources.PeakRSS()
    rss.start()
    if not rss.resettable:
        pytest.skip("this kernel does not reset the peak RSS (/proc/self/clear_refs)")
    block = np.ones(300_000_000 // 8)  # 300 MB touched
    big = rss.stop()
    del block
    rss.start()
    small = rss.stop()
    assert big - small > 250e6, (big, small)


def test_peak_anonymous_memory_counts_the_heap_not_mapped_file_pages(tmp_path: Path) -> None:
    """A stage that reads a 200 MB memory-mapped file raises the kernel's peak RSS by about that much
    and its peak anonymous memory by nothing like it; 300 MB of its own arrays raise both."""
    import numpy as np

    from edgeft.resources import PeakRSS, _status_kb

    if _status_kb("RssAnon") is None:
        pytest.skip("no RssAnon in /proc/self/status")
    path = tmp_path / "weights.bin"
    np.ones(200_000_000 // 8).tofile(path)
    rss = PeakRSS()
    rss.start()
    start_anon = rss.peak_anon_bytes
    mapped = np.memmap(path, dtype=np.float64, mode="r")
    assert float(mapped.sum()) == mapped.size  # every page read
    peak = rss.stop()
    if rss.resettable:
        assert peak - rss.start_bytes > 150e6, (peak, rss.start_bytes)
    assert rss.peak_anon_bytes - start_anon < 50e6, (rss.peak_anon_bytes, start_anon)
    del mapped
    rss.start()
    start_anon = rss.peak_anon_bytes
    block = np.ones(300_000_000 // 8)  # 300 MB of the process's own, touched
    rss.stop()
    del block
    assert rss.peak_anon_bytes - start_anon > 250e6, (rss.peak_anon_bytes, start_anon)


def test_build_refuses_before_training_when_ram_is_short(tmp_path: Path, tokenizer) -> None:
    """Through the CLI: a machine declared at 1 GB refuses the build in one line, exit 2, nothing written."""
    cfg = tiny_build_config(tmp_path, tokenizer, "max_steps = 1\n")
    args = ["build", "--config", str(cfg), "--target", "gguf-q8", "--out", "out"]
    run = run_edgeft(args, tmp_path, env={"EDGEFT_RAM_BYTES": str(10**9)})
    assert_refused(run, "needs about", "GB of RAM", "this machine has 1.0 GB")
    assert not (tmp_path / "out").exists()
    dry = run_edgeft([*args, "--dry-run"], tmp_path, env={"EDGEFT_RAM_BYTES": str(10**9)})
    assert dry.returncode == 0, dry.stderr
    shown = json.loads(dry.stdout)["resources"]
    assert shown["machine_ram_bytes"] == 10**9 and shown["peak_ram_bytes"] > 10**9
    assert "resource plan (estimates)" in dry.stderr and "would refuse" in dry.stderr


def test_a_stage_starts_from_the_memory_earlier_stages_freed():
    """PeakRSS.start hands freed heap back to the OS first, so a stage's start RSS (and peak) does not
    carry what an earlier stage allocated and freed. Small live blocks between the freed ones keep
    glibc from trimming the heap by itself (measured: ~255 MB stay resident without the trim)."""
    from edgeft.resources import PeakRSS, _release_freed_memory, _status_kb

    # Start from a trimmed heap: freed heap that tests run earlier in this process left resident
    # would otherwise be reused by the blocks below without growing RSS (CI: 172 MB of 262 grew).
    _release_freed_memory()
    before = _status_kb("VmRSS")
    blocks, pins = [], []
    for _ in range(4000):
        blocks.append(bytearray(b"\x01" * (1 << 16)))  # 64 KiB: from the heap, not a mapping of its own
        pins.append(bytearray(b"\x02" * 600))
    assert _status_kb("VmRSS") - before > 200e6
    del blocks
    rss = PeakRSS()
    rss.start()
    assert rss.start_bytes is not None and rss.start_bytes - before < 100e6
    assert rss.stop() >= rss.start_bytes - (1 << 20)
    assert len(pins) == 4000


def test_every_stage_a_mixed_target_runs_has_an_estimate(tmp_path: Path, smollm2_dir: Path) -> None:
    """The plan names stages as the build does, so the report can put estimate and measurement side
    by side (the sweep's estimate once went unmatched under another name)."""
    from edgeft.formats.gguf import sensitivity_stage_name

    shape = resources.shape_from_safetensors(smollm2_dir)
    targets = parse_target_list("gguf-q4-mixed")
    plan = resources.plan(load_config(None), targets, tmp_path / "out", shape)
    names = [s.stage for s in plan.stages]
    assert (
        sensitivity_stage_name(targets[0]) == "sensitivity q4_k-q5_k-q8_0"
        and sensitivity_stage_name(targets[0]) in names
    )
    assert {"quantize gguf-q4-mixed", "bench gguf-q4-mixed"} <= set(names)
