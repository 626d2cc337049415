"""Importance-weighted int4 rounding for ONNX (``imatrix`` on an ONNX int4 target).

The blocks it writes are checked against onnxruntime's MatMulNBits kernel, its error against the
builder's rounding block by block, and the folder it rewrites on a tiny llama (real SmolLM2
tokenizer) against the builder's folder: same bytes on disk, less held-out KL divergence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .cli import run_edgeft
from .cores import THREADS
from .tiny import assert_target_refused, held_out_kld, tiny_build_config, uneven_onnx_exports

pytest.importorskip("onnxruntime_genai")


def _weights(seed: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights with uneven rows and an importance spanning four orders of magnitude."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * np.exp(rng.standard_normal((k, 1)))).astype(np.float32)
    return w, np.exp(2.3 * rng.standard_normal(k))


def _matmulnbits_session(levels: np.ndarray, scales: np.ndarray, k: int, tmp: Path):
    """One hand-made MatMulNBits node over our bytes, run by onnxruntime's own kernel (fp32 compute)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeft.formats.onnx.rounding import pack

    n, k_blocks, block = levels.shape
    node = helper.make_node(
        "MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
        accuracy_level=0,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(pack(levels), "b"), numpy_helper.from_array(scales.reshape(-1), "s")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    path = tmp / "mm.onnx"
    path.write_bytes(model.SerializeToString())
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("k", [96, 80])  # 80: the last block is padded
def test_written_blocks_compute_what_the_sweep_simulates(tmp_path, k):
    from edgeft.formats.onnx.rounding import dequantize, fake_quant, round_int4

    w, importance = _weights(k, k, 40)
    levels, scales = round_int4(w, importance)
    assert levels.dtype == np.uint8 and levels.max() <= 15 and scales.shape == (40, -(-k // 32))
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    want = _matmulnbits_session(levels, scales, k, tmp_path).run(["y"], {"x": x})[0]
    assert np.abs(x @ dequantize(levels, scales, k) - want).max() < 1e-4 * np.abs(want).max()
    assert np.array_equal(fake_quant(w, importance), dequantize(levels, scales, k))


def _block_errors(w: np.ndarray, rounded: np.ndarray, importance: np.ndarray) -> np.ndarray:
    k = w.shape[0]
    pad = -k % 32
    err = np.pad(importance[:, None] * (w - rounded) ** 2, ((0, pad), (0, 0)))
    return err.reshape(-1, 32, w.shape[1]).sum(axis=1)  # [k_blocks, N]


@pytest.mark.parametrize("k", [96, 80])
def test_no_block_has_more_weighted_error_than_the_builders_and_most_have_less(k):
    from edgeft.formats.onnx.rounding import fake_quant
    from edgeft.formats.onnx.sweep import fake_quant as builder_rounding

    w, importance = _weights(7 + k, k, 64)
    ours = _block_errors(w, fake_quant(w, importance), importance)
    builder = _block_errors(w, builder_rounding(w, 4), importance)
    assert np.all(ours <= builder * (1 + 1e-5) + 1e-12)
    assert ours.sum() < 0.9 * builder.sum(), (ours.sum(), builder.sum())


def test_without_importance_a_block_keeps_the_builders_rounding():
    from edgeft.formats.onnx.rounding import fake_quant
    from edgeft.formats.onnx.sweep import fake_quant as builder_rounding

    w, importance = _weights(3, 96, 16)
    importance[32:64] = 0  # the middle block's columns never fire
    ours, builder = fake_quant(w, importance), builder_rounding(w, 4)
    assert np.allclose(ours[32:64], builder[32:64], rtol=1e-6, atol=1e-7)
    assert not np.allclose(ours[:32], builder[:32], rtol=1e-3)


# ------------------------------------------------------------------------------ on a tiny llama


@pytest.fixture(scope="module")
def loud_onnx(tmp_path_factory, tokenizer) -> dict:
    """A tiny tied llama with loud channels, its fp32 and builder-int4 exports and a task calibration set."""
    return uneven_onnx_exports(tmp_path_factory.mktemp("onnx-rounding"), tokenizer, seed=5, calib_tokens=1024)


@pytest.mark.slow
def test_importance_is_each_matmul_inputs_mean_square(loud_onnx):
    """The ONNX graph's MatMul inputs, measured by onnxruntime, against the same inputs hooked in torch."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.formats.onnx.rounding import importance_stage, read_importance

    stage = importance_stage(
        loud_onnx["fp32"], loud_onnx["root"] / "imatrix-onnx-task", loud_onnx["calib"], threads=THREADS
    )
    importance = read_importance(stage.path)
    assert len(importance) == 3 * 5 + 1 and stage.manifest["results"]["tokens"] == loud_onnx["calib"].chunks.size

    model = AutoModelForCausalLM.from_pretrained(loud_onnx["hf"], dtype=torch.float32).eval()
    seen: dict[str, list] = {}
    modules = {
        "/model/layers.0/attn/qkv_proj/MatMul": model.model.layers[0].self_attn.q_proj,
        "/model/layers.2/mlp/down_proj/MatMul": model.model.layers[2].mlp.down_proj,
        "/lm_head/MatMul": model.lm_head,
    }
    for name, module in modules.items():
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, []).append(args[0][0]))
    with torch.no_grad():
        for chunk in loud_onnx["calib"].chunks:
            model(input_ids=torch.as_tensor(chunk, dtype=torch.long)[None])
    for name in modules:
        x = torch.cat(seen[name]).double()
        assert np.allclose(importance[name], (x * x).mean(0).numpy(), rtol=2e-3, atol=1e-7), name


def _matmulnbits_initializers(folder: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    from edgeft.formats.onnx.graph import load_decoder

    model = load_decoder(folder)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            out[node.name.rsplit("_Q", 1)[0]] = (inits[node.input[1]], inits[node.input[2]])
    return out


@pytest.mark.slow
def test_rewritten_folder_is_the_builders_shape_with_our_blocks_and_loses_less(loud_onnx, tokenizer, tmp_path):
    import onnx

    from edgeft.formats.onnx.export import export
    from edgeft.formats.onnx.graph import Layout, load_decoder
    from edgeft.formats.onnx.inspect import describe
    from edgeft.formats.onnx.rounding import importance_stage, pack, read_importance, round_int4
    from edgeft.runtimes.onnxruntime_genai import OnnxGenaiRuntime

    stage = importance_stage(
        loud_onnx["fp32"], loud_onnx["root"] / "imatrix-onnx-task", loud_onnx["calib"], threads=THREADS
    )
    out = export(loud_onnx["hf"], tmp_path / "imat", "int4", {}, rounding=(loud_onnx["fp32"], stage.path))
    assert out.manifest["results"]["rounding"]["matmuls"] == 3 * 5 + 1
    builder, ours = describe(loud_onnx["int4"]), describe(out.path)
    assert ours["size_bytes"] == builder["size_bytes"] and ours["tensor_types"] == builder["tensor_types"]
    plain, written = (
        onnx.load(str(loud_onnx["int4"] / "model.onnx"), load_external_data=False),
        onnx.load(str(out.path / "model.onnx"), load_external_data=False),
    )
    assert plain.graph.node == written.graph.node  # the same graph; only initializer values changed

    # every block on disk is the rounding of the fp32 weight by its importance, the tied head included
    fp32 = load_decoder(loud_onnx["fp32"])
    layout = Layout.of(fp32)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in fp32.graph.initializer}
    importance = read_importance(stage.path)
    on_disk, builders = _matmulnbits_initializers(out.path), _matmulnbits_initializers(loud_onnx["int4"])
    assert set(on_disk) == set(layout.weights)
    for name, (b, s) in on_disk.items():
        levels, scales = round_int4(weights[layout.weights[name]], importance[name])
        assert np.array_equal(b, pack(levels)) and np.array_equal(s, scales), name
    assert sum(not np.array_equal(on_disk[n][0], builders[n][0]) for n in on_disk) == len(on_disk)

    ref = OnnxGenaiRuntime(loud_onnx["fp32"], threads=THREADS)
    kld_builder = held_out_kld(ref, OnnxGenaiRuntime(loud_onnx["int4"], threads=THREADS), tokenizer, 12)
    kld_ours = held_out_kld(ref, OnnxGenaiRuntime(out.path, threads=THREADS), tokenizer, 12)
    # a random tiny model is far from linear in its weights (KLD ~2 at int4): a margin is for SmolLM2
    assert kld_ours < kld_builder, (kld_ours, kld_builder)


@pytest.mark.slow
def test_initializers_kept_in_the_graph_file_are_rewritten_like_external_ones(loud_onnx, tmp_path):
    """Small models may keep initializers inside model.onnx: the same rounding lands there."""
    import shutil

    import onnx

    from edgeft.formats.onnx.graph import load_decoder
    from edgeft.formats.onnx.rounding import importance_stage, read_importance, reround

    importance = read_importance(
        importance_stage(
            loud_onnx["fp32"], loud_onnx["root"] / "imatrix-onnx-task", loud_onnx["calib"], threads=THREADS
        ).path
    )
    external, inline = tmp_path / "external", tmp_path / "inline"
    for folder in (external, inline):
        shutil.copytree(loud_onnx["int4"], folder)  # copies, not the stage's hard links: rewritten in place
    model = load_decoder(inline)
    (inline / "model.onnx.data").unlink()
    onnx.save(model, str(inline / "model.onnx"))
    assert reround(inline, loud_onnx["fp32"], importance) == reround(external, loud_onnx["fp32"], importance)
    ours, theirs = _matmulnbits_initializers(inline), _matmulnbits_initializers(external)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert all(np.array_equal(a, b) for a, b in zip(ours[name], theirs[name])), name


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('quant = "int4"\nimatrix = "wiki"\n', "imatrix: expected one of task, general, mix, got 'wiki'"),
        ('quant = "int8"\nimatrix = "task"\n', 'imatrix: weighs int4 rounding only (int8 loses little); set quant = "int4"'),
        ('quant = "int4"\nimatrix = "task"\nalgo_config = "k_quant"\n', "algo_config: imatrix re-rounds the 'default' quantizer's blocks, got 'k_quant'"),
    ],
)  # fmt: skip
def test_imatrix_target_fields_are_checked(tmp_path, monkeypatch, body, message):
    assert_target_refused(tmp_path, monkeypatch, 'format = "onnx"\n' + body, message)


@pytest.mark.slow
def test_imatrix_targets_build_alone_and_under_a_budget(tmp_path, tokenizer):
    """Through `edgeft build`: one importance stage serves both targets; the budgeted one sweeps
    with the weighted rounding and writes it for its int4 MatMuls."""
    cfg = tiny_build_config(
        tmp_path,
        tokenizer,
        "max_steps = 2\nbatch_size = 4\nmax_seq_len = 64\nrank = 4\nvalidation_share = 0\n",
        extra="[calibration]\ntokens = 512\nchunk_tokens = 128\nsensitivity_tokens = 256\n",
    )
    (tmp_path / "t-imat.toml").write_text('format = "onnx"\nquant = "int4"\nimatrix = "task"\n')
    (tmp_path / "t-mixed-imat.toml").write_text(
        'format = "onnx"\nquant = "int4"\nimatrix = "task"\nmax_size_ratio = 1.2\n'
    )
    out = tmp_path / "build"
    targets = f"{tmp_path / 't-imat.toml'},{tmp_path / 't-mixed-imat.toml'}"
    proc = run_edgeft(["build", "--config", cfg, "--target", targets, "--out", out], timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "imatrix-onnx-task" / "importance.npz").is_file()
    assert (out / "sensitivity-onnx-int4-int8-imat-task" / "sensitivity.json").is_file()
    alone = json.loads((out / "t-imat" / "manifest.json").read_text())["results"]
    mixed = json.loads((out / "t-mixed-imat" / "manifest.json").read_text())["results"]
    assert alone["rounding"]["matmuls"] == 2 * 5 + 1  # the tiny build model: 2 layers
    assert mixed["int8_nodes"] and mixed["rounding"]["matmuls"] == 2 * 5 + 1 - len(mixed["int8_nodes"])
    rows = {r["stage"]: r for r in json.loads((out / "report.json").read_text())["ladder"]}
    assert rows["t-imat"]["kl_divergence_mean"] >= 0 and rows["t-mixed-imat"]["kl_divergence_mean"] >= 0
