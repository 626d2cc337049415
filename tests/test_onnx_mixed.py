"""Size-budgeted ONNX: per-MatMul int4/int8 from a measured sensitivity sweep, written by the builder.

The rounding the sweep simulates is checked against onnxruntime's MatMulNBits itself; the sweep, the
plan and the folder the builder writes are checked against each other on a tiny llama (real
SmolLM2 tokenizer), and the plan against the opposite plan on held-out KLD.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import ConfigError

from .cli import run_edgeft
from .cores import THREADS
from .tiny import assert_target_refused, held_out_kld, tiny_build_config, uneven_onnx_exports

pytest.importorskip("onnxruntime_genai")

COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"


def _matmulnbits(w: np.ndarray, bits: int, tmp: Path):
    """A one-MatMul model quantized by onnxruntime's own MatMulNBitsQuantizer (fp32 compute)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True, accuracy_level=1)
    q.process()
    path = tmp / f"mm{bits}.onnx"
    onnx.save(q.model.model, str(path))
    quantized = onnx.load(str(path))
    nbytes = sum(numpy_helper.to_array(i).nbytes for i in quantized.graph.initializer)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), nbytes


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [96, 80])  # 80: the last block is padded
def test_simulated_rounding_is_matmulnbits_rounding(tmp_path, bits, k):
    from edgeft.formats.onnx.graph import matmul_bytes
    from edgeft.formats.onnx.sweep import fake_quant

    rng = np.random.default_rng(bits + k)
    w = (rng.standard_normal((k, 48)) * np.exp(rng.standard_normal((k, 1)))).astype(np.float32)
    x = rng.standard_normal((5, k)).astype(np.float32)
    session, nbytes = _matmulnbits(w, bits, tmp_path)
    want = session.run(["y"], {"x": x})[0]
    got = x @ fake_quant(w, bits)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    assert not np.allclose(x @ w, want, rtol=1e-3)  # the rounding is real, and it is what we reproduce
    assert matmul_bytes(k, 48, bits) == nbytes


# ------------------------------------------------------------------------- the proxy's probes and fit

ROLES = ("attn/qkv_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


def _layout(layers: int):
    from edgeft.formats.onnx.graph import HEAD, Layout

    nodes = [f"/model/layers.{i}/{r}/MatMul" for i in range(layers) for r in ROLES] + [HEAD]
    return Layout({n: n + ".weight" for n in nodes}, {n: (64, 64) for n in nodes}, None)


def test_the_proxy_probes_roles_and_runs_of_layers_and_auto_takes_the_cheaper_method():
    from edgeft.formats.onnx.graph import HEAD
    from edgeft.formats.onnx.sweep import choose_method, probes

    proxy = [p.key for p in probes(_layout(30), "proxy")]
    assert proxy[0] == HEAD and len(proxy) == 1 + 5 + 11  # the head, 5 roles, layer 0 + 10 runs of ~3
    assert proxy[-2:] == ["depth:25-27", "depth:28-29"]
    assert len(probes(_layout(30), "exact")) == 151
    # the proxy also probes alone the 8 nodes its first fit finds most sensitive: 16 probes from 4 layers
    assert [choose_method(_layout(n)) for n in (1, 3, 4, 30)] == ["exact", "exact", "proxy", "proxy"]


@pytest.mark.parametrize("known", [0, 3])
def test_the_fit_recovers_rates_and_depth_factors_from_probes_that_add_up(known):
    """Added KLD made exactly rate(role) × depth(run of layers) × local error: the fit finds every
    node's figure from the 10 calibrating probes (5 roles, 5 runs) alone, and with some nodes measured on their own
    (taken out of the probes that hold them) it finds the others'."""
    from edgeft.formats.onnx.sweep import depth_blocks, fit, layer_of, probes, role_of

    rng = np.random.default_rng(1)
    layout = _layout(12)
    rate = {role_of(n): r for n, r in zip(layout.weights, rng.uniform(0.1, 3, 5))}
    blocks = depth_blocks(12)
    depth = np.concatenate([np.full(len(b), f) for b, f in zip(blocks, rng.uniform(0.2, 4, len(blocks)))])
    local = {n: float(rng.uniform(0, 2)) for n in layout.weights if role_of(n)}
    truth = {n: rate[role_of(n)] * depth[layer_of(n)] * e for n, e in local.items()}
    calibrating = [p for p in probes(layout, "proxy") if ":" in p.key]
    alone = {n: truth[n] for n in list(truth)[5 : 5 + known]}
    found = fit(calibrating, {p.key: sum(truth[n] for n in p.nodes) for p in calibrating}, local, alone)
    for n, want in truth.items():
        assert (0.0 if n in alone else want) == pytest.approx(found.predict(n), rel=1e-6, abs=1e-12), n
    assert all(r["fitted_kld"] == pytest.approx(r["added_kld"], rel=1e-6) for r in found.rows)


# ---------------------------------------------------------------- the sweep, the plan and the folder


@pytest.fixture(scope="module")
def uneven_onnx(tmp_path_factory, tokenizer) -> dict:
    """A tiny tied llama whose MatMuls differ in sensitivity (see make_uneven_tiny_llama)."""
    uneven_onnx = uneven_onnx_exports(tmp_path_factory.mktemp("onnx-mixed"), tokenizer, seed=3, calib_tokens=2048)
    return {**uneven_onnx, "calib": uneven_onnx["calib"].spread(512)}


@pytest.fixture(scope="module")
def uneven_sweeps(uneven_onnx, tmp_path_factory) -> dict[str, Path]:
    """The tiny llama's sensitivity stage swept by each method ("auto" takes "exact" at 3 layers)."""
    from edgeft.formats.onnx.mixed import sensitivity_stage

    root = tmp_path_factory.mktemp("onnx-sweeps")
    return {
        m: sensitivity_stage(
            uneven_onnx["fp32"], uneven_onnx["int4"], root / m, uneven_onnx["calib"], threads=THREADS, method=m
        ).path
        for m in ("auto", "proxy")
    }


def _nodes(folder: Path) -> dict[str, int]:
    """MatMulNBits node (its source MatMul's name) → bits, as written."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            out[node.name.rsplit("_Q", 1)[0]] = next(a.i for a in node.attribute if a.name == "bits")
    return out


def _held_out_kld(ref: Path, q: Path, tokenizer) -> float:
    from edgeft.runtimes.onnxruntime_genai import OnnxGenaiRuntime

    return held_out_kld(OnnxGenaiRuntime(ref, threads=THREADS), OnnxGenaiRuntime(q, threads=THREADS), tokenizer, 12)


@pytest.mark.slow
def test_sweep_plan_and_folder_agree_and_beat_the_opposite_plan(uneven_onnx, uneven_sweeps, tokenizer, tmp_path):
    from edgeft.formats.onnx.export import export
    from edgeft.formats.onnx.graph import HEAD
    from edgeft.formats.onnx.inspect import describe
    from edgeft.formats.onnx.mixed import SENSITIVITY_FILE, overrides, read_plan

    sens_dir = uneven_sweeps["auto"]
    sens = json.loads((sens_dir / SENSITIVITY_FILE).read_text())
    groups = {g["name"]: g for g in sens["groups"]}
    # one group per MatMul the builder quantizes, named as the builder names them
    assert set(groups) == set(_nodes(uneven_onnx["int4"]))
    assert len(groups) == 3 * 5 + 1 and HEAD in groups
    assert sens["method"] == "exact" and sens["probes"] == 1 + len(groups)
    # the tied embedding shares the int4 head; at int8 it would be an fp32 table of its own
    vocab, hidden = sens["tied_embedding"]
    head = {o["level"]: o["bytes"] for o in groups[HEAD]["options"]}
    assert head["int8"] - head["int4"] > vocab * hidden * 4
    added = {name: g["options"][0]["added_kld"] for name, g in groups.items()}
    assert max(added.values()) > 3 * min(v for v in added.values() if v > 0)
    # the all-int4 size the plan starts from is the real one, within the slack for graph growth
    all_int4 = sens["fixed_bytes"] + sum(g["options"][0]["bytes"] for g in sens["groups"])
    assert 0 <= all_int4 - describe(uneven_onnx["int4"])["size_bytes"] < 16_384

    # room for about half the body's extra int8 bytes (the head's int8 option, with its fp32 table, never fits)
    extra = sum(g["options"][1]["bytes"] - g["options"][0]["bytes"] for n, g in groups.items() if n != HEAD)
    chosen = read_plan(sens_dir, {"max_size_mb": (all_int4 + extra / 2) / 1e6}, "t")
    assert chosen["levels"][HEAD] == "int4"
    promoted = overrides(chosen["levels"])
    assert 0 < len(promoted) < len(groups) - 1  # the budget forced a real mix
    out = export(uneven_onnx["hf"], tmp_path / "mixed", "int4", {}, overrides=promoted).path
    written = _nodes(out)
    assert {n for n, b in written.items() if b == 8} == {o["match"]["name"] for o in promoted}
    assert describe(out)["size_bytes"] <= chosen["max_bytes"]

    # the opposite plan: what the plan kept at int8 goes to int4, the least sensitive others go up
    room = chosen["max_bytes"] - all_int4
    opposite = []
    for name in sorted((n for n in groups if chosen["levels"][n] == "int4"), key=added.get):
        opt = {o["level"]: o["bytes"] for o in groups[name]["options"]}
        if opt["int8"] - opt["int4"] <= room:
            opposite.append({"match": {"name": name}, "type": "int8"})
            room -= opt["int8"] - opt["int4"]
    other = export(uneven_onnx["hf"], tmp_path / "opposite", "int4", {}, overrides=opposite).path
    assert describe(other)["size_bytes"] <= chosen["max_bytes"]
    kld_plan = _held_out_kld(uneven_onnx["fp32"], out, tokenizer)
    kld_opposite = _held_out_kld(uneven_onnx["fp32"], other, tokenizer)
    assert kld_plan < kld_opposite, (kld_plan, kld_opposite)


def _held_array_bytes(obj, seen=None) -> int:
    """Bytes of the numpy arrays reachable from ``obj``'s attributes, dicts and lists, not counting
    views of memory-mapped files (the page cache's, not the object's)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        base = obj
        while isinstance(base, np.ndarray) and not isinstance(base, np.memmap) and base.base is not None:
            base = base.base
        return 0 if isinstance(base, np.memmap) else obj.nbytes
    if isinstance(obj, dict):
        return sum(_held_array_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_held_array_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("edgeft"):
        return sum(_held_array_bytes(v, seen) for v in vars(obj).values())
    return 0


def test_the_probe_holds_one_copy_of_the_weights(uneven_onnx, tmp_path):
    """The int8-rounded weights every probe starts from are the only copy it keeps; the fp32 ones are
    read from the export's mapped file (before: an fp32 dict, an int8 dict and full-vocabulary
    reference rows, over twice the model)."""
    from edgeft.formats.onnx.sweep import ProbeModel, fake_quant

    probe = ProbeModel(uneven_onnx["fp32"], tmp_path, threads=THREADS)
    one_copy = sum(4 * k * n for k, n in probe.layout.shapes.values())
    held = _held_array_bytes(probe)
    assert one_copy <= held < 1.02 * one_copy, (held, one_copy)
    weight = next(iter(probe.base))
    fp32 = probe.fp32[weight]
    assert _held_array_bytes(fp32) == 0  # a view of the mapped file
    np.testing.assert_array_equal(probe.base[weight], fake_quant(fp32, 8))
    assert not np.array_equal(probe.base[weight], fp32)


@pytest.mark.slow
def test_the_proxy_sweep_ranks_the_tiny_models_nodes_like_the_exact_one(uneven_sweeps):
    """On the uneven tiny llama (3 layers, layer 1 loud; "auto" takes "exact" there, as cheap): the
    head probed alone, 5 role and 2 depth probes calibrating the local errors, then the 8 nodes
    predicted most sensitive probed alone; its figures rank the layer nodes as the exact probes do,
    and the calibrating role probes come out as measured."""
    from edgeft.formats.onnx.graph import HEAD
    from edgeft.formats.onnx.mixed import SENSITIVITY_FILE

    exact, proxy = (json.loads((uneven_sweeps[m] / SENSITIVITY_FILE).read_text()) for m in ("auto", "proxy"))
    assert proxy["method"] == "proxy" and proxy["probes"] == 1 + 1 + 5 + 2 + 8
    sources = [g["options"][0]["source"] for g in proxy["groups"]]
    assert sources.count("probe") == 1 + 8 and sources.count("proxy") == 15 - 8
    strip = [[{k: v for k, v in o.items() if k in ("level", "bytes")} for o in g["options"]] for g in exact["groups"]]
    assert strip == [
        [{k: v for k, v in o.items() if k in ("level", "bytes")} for o in g["options"]] for g in proxy["groups"]
    ]
    added = {
        m: {g["name"]: g["options"][0]["added_kld"] for g in s["groups"]}
        for m, s in (("exact", exact), ("proxy", proxy))
    }
    assert added["proxy"][HEAD] == pytest.approx(added["exact"][HEAD], rel=1e-6)  # probed alone by both
    for row in proxy["calibration"]:  # the rest of a role probe, past its nodes measured alone, is fitted exactly
        if row["probe"].startswith("role:"):
            assert row["fitted_kld"] == pytest.approx(max(row["alone_kld"], row["added_kld"]), rel=1e-6), row
    layer = [n for n in added["exact"] if n != HEAD]
    rho = _spearman([added["exact"][n] for n in layer], [added["proxy"][n] for n in layer])
    print(f"spearman {rho:.3f}")
    assert rho >= 0.8, rho  # measured 0.94
    assert max(layer, key=added["exact"].get) == max(layer, key=added["proxy"].get)


def _spearman(a, b) -> float:
    rank = [np.argsort(np.argsort(x)) for x in (a, b)]
    return float(np.corrcoef(*rank)[0, 1])


def test_a_budget_below_the_all_int4_folder_is_refused(uneven_onnx):
    from edgeft.formats.onnx.mixed import check_budget

    with pytest.raises(ConfigError, match=r"max_size_mb = 0.5: the smallest file this mix can make is [\d.]+ MB"):
        check_budget({"max_size_mb": 0.5}, uneven_onnx["fp32"], uneven_onnx["int4"])
    check_budget({"max_size_mb": 500}, uneven_onnx["fp32"], uneven_onnx["int4"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('quant = "int4"\nmax_size_mb = 100\nmax_size_ratio = 1.1\n', "max_size_mb and max_size_ratio: give one"),
        ('quant = "int4"\nmax_size_ratio = 0.9\n', "max_size_ratio: expected at least 1"),
        ('quant = "int4"\nmax_size_mb = "100"\n', "max_size_mb: expected a positive number"),
        ('quant = "int8"\nmax_size_ratio = 1.15\n', 'max_size_ratio: a size budget mixes int4 and int8 MatMuls; set quant = "int4"'),
        ('quant = "int4"\nmax_size_ratio = 1.15\nalgo_config = "k_quant"\n', "algo_config: a size-budgeted target uses 'default'"),
        ('quant = "int4"\nmax_size_ratio = 1.15\nblock_size = 64\n', "block_size: a size-budgeted target uses 32"),
    ],
)  # fmt: skip
def test_budget_target_fields_are_checked(tmp_path, monkeypatch, body, message):
    assert_target_refused(tmp_path, monkeypatch, 'format = "onnx"\n' + body, message)


@pytest.mark.slow
def test_a_budgeted_onnx_target_builds_and_an_impossible_budget_stops_before_the_sweep(tmp_path, tokenizer):
    """Through `edgeft build`: the row and the plan in the folder's manifest; then a budget below the
    all-int4 folder is one line, exit 2, with no sensitivity folder written."""
    cfg = tiny_build_config(
        tmp_path,
        tokenizer,
        "max_steps = 2\nbatch_size = 4\nmax_seq_len = 64\nrank = 4\nvalidation_share = 0\n",
        extra="[calibration]\ntokens = 512\nchunk_tokens = 128\nsensitivity_tokens = 256\n",
    )
    target = tmp_path / "tiny-onnx-mixed.toml"
    target.write_text('format = "onnx"\nquant = "int4"\nmax_size_ratio = 1.2\n')
    out = tmp_path / "build"

    def build():
        return run_edgeft(["build", "--config", cfg, "--target", target, "--out", out], timeout=900)

    proc = build()
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "tiny-onnx-mixed" / "manifest.json").read_text())["results"]
    assert manifest["plan"]["predicted_bytes"] <= manifest["plan"]["max_bytes"]
    assert manifest["int8_nodes"]  # the budget had room for some
    rows = {r["stage"]: r for r in json.loads((out / "report.json").read_text())["ladder"]}
    assert rows["tiny-onnx-mixed"]["kl_divergence_mean"] >= 0

    import shutil

    shutil.rmtree(out / "sensitivity-onnx-int4-int8")
    target.write_text('format = "onnx"\nquant = "int4"\nmax_size_mb = 0.5\n')
    proc = build()
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("edgeft: error")]
    assert len(lines) == 1 and proc.stderr.strip().endswith(lines[0])
    assert "--target tiny-onnx-mixed: max_size_mb = 0.5: the smallest file this mix can make is" in lines[0]
    assert "Traceback" not in proc.stderr and not (out / "sensitivity-onnx-int4-int8").exists()


# ------------------------------------------------------------------------------- real SmolLM2


@pytest.mark.integration
def test_smollm2_importance_rounding_and_budget_beat_builder_int4_on_held_out_replies(
    smollm2_dir, edgeft_cache, cache_lock, tokenizer
):
    """The real model, with importance measured on 2048 task tokens and a short sweep (256 tokens: the
    test checks the mechanism, docs/quantization.md the figures): the re-rounded all-int4 folder, at the
    builder's size, loses clearly less than the builder's int4 (measured 0.40 against 0.66), and
    within 1.15× its size the plan reaches the ONNX goal, ≤ 0.4× its KLD (measured 0.20); both
    still answer and stop."""
    from edgeft.bench.fidelity import reply_sequences
    from edgeft.calibration import build_set
    from edgeft.data import load_jsonl
    from edgeft.formats.onnx.export import export
    from edgeft.formats.onnx.inspect import describe
    from edgeft.formats.onnx.mixed import overrides, read_plan, sensitivity_stage
    from edgeft.formats.onnx.rounding import importance_stage
    from edgeft.runtimes.onnxruntime_genai import OnnxGenaiRuntime

    root = edgeft_cache / "onnx-exports"
    name = smollm2_dir.name
    with cache_lock("onnx-exports"):  # test_onnx.py makes these two too
        fp32, int4 = (export(smollm2_dir, root / f"{name}-{q}", q, {}).path for q in ("fp32", "int4"))
    calib = build_set("task", tokenizer, COOKING / "train.jsonl", tokens=2048, chunk_tokens=256, task_share=0.5)
    importance = importance_stage(fp32, root / f"{name}-imatrix-task", calib, threads=THREADS).path
    rounding = (fp32, importance)
    imat = export(smollm2_dir, root / f"{name}-int4-imat", "int4", {}, rounding=rounding).path
    assert describe(imat)["size_bytes"] == describe(int4)["size_bytes"]
    sens = sensitivity_stage(
        fp32, int4, root / f"{name}-sensitivity-imat", calib.spread(256), threads=THREADS, importance_dir=importance
    )
    chosen = read_plan(sens.path, {"max_size_ratio": 1.15}, "test")
    promoted = overrides(chosen["levels"])
    mixed = export(
        smollm2_dir, root / f"{name}-int4-mixed-imat", "int4", {}, overrides=promoted, rounding=rounding
    ).path
    assert describe(mixed)["size_bytes"] <= 1.15 * describe(int4)["size_bytes"] + 1e5
    assert 20 < len(promoted) < 100

    runtimes = {
        k: OnnxGenaiRuntime(p, threads=THREADS) for k, p in {"int4": int4, "imat": imat, "mixed": mixed}.items()
    }
    ref = OnnxGenaiRuntime(fp32, threads=THREADS)
    rows: dict[str, list] = {k: [] for k in runtimes}
    for seq in reply_sequences(tokenizer, load_jsonl(COOKING / "eval.jsonl")[:8]):
        r = ref.logits(seq.tokens)
        for k, rt in runtimes.items():
            rows[k].append(_kld_rows(r, rt.logits(seq.tokens)))
    kld = {k: float(np.concatenate(v).mean()) for k, v in rows.items()}
    assert kld["imat"] < 0.85 * kld["int4"], kld
    assert kld["mixed"] < 0.4 * kld["int4"], kld
    for k in ("imat", "mixed"):
        out = runtimes[k].generate([{"role": "user", "content": "What is the capital of France? One word."}], 48)
        assert out.stopped and "Paris" in out.text, (k, out.text)


def _kld_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    from edgeft.bench.fidelity import log_softmax

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


@pytest.mark.integration
@pytest.mark.skipif(
    not os.environ.get("EDGEFT_LONG_TESTS"),
    reason="the exact sweep of SmolLM2 takes about 10 minutes: EDGEFT_LONG_TESTS=1 runs it",
)
def test_smollm2_proxy_sweep_plans_within_ten_percent_of_the_exact_one(
    smollm2_dir, edgeft_cache, cache_lock, tokenizer
):
    """Both sweeps of the real model on 512 task tokens (builder rounding; the exact one takes about
    10 minutes on 2 cores, both are kept in the edgeft cache): the proxy's 26 probes against 152 rank
    the layer MatMuls alike (measured 0.76), and at 1.15× the int4 size the proxy plan's held-out KLD,
    simulated in the probe model over 4 × 256 tokens of the cooking eval set, is within 10% of the
    exact plan's (measured 0.1945 against 0.1865)."""
    import tempfile

    from edgeft.calibration import build_set
    from edgeft.divergence import kl_divergence, log_softmax
    from edgeft.formats.onnx.export import export
    from edgeft.formats.onnx.mixed import SENSITIVITY_FILE, read_plan, sensitivity_stage
    from edgeft.formats.onnx.sweep import ProbeModel, fake_quant

    root = edgeft_cache / "onnx-exports"
    name = smollm2_dir.name
    with cache_lock("onnx-exports"):  # test_onnx.py makes these two too
        fp32, int4 = (export(smollm2_dir, root / f"{name}-{q}", q, {}).path for q in ("fp32", "int4"))
    calib = build_set("task", tokenizer, COOKING / "train.jsonl", tokens=2048, chunk_tokens=256, task_share=0.5)
    sweeps = {
        m: sensitivity_stage(fp32, int4, root / f"{name}-sensitivity-{m}", calib.spread(512), THREADS, method=m).path
        for m in ("exact", "proxy")
    }
    sens = {m: json.loads((d / SENSITIVITY_FILE).read_text()) for m, d in sweeps.items()}
    assert (sens["exact"]["probes"], sens["proxy"]["probes"]) == (152, 26)
    added = {m: {g["name"]: g["options"][0]["added_kld"] for g in s["groups"]} for m, s in sens.items()}
    layer = [n for n in added["exact"] if "/layers." in n]
    rho = _spearman([added["exact"][n] for n in layer], [added["proxy"][n] for n in layer])
    assert rho >= 0.6, rho

    held = build_set("task", tokenizer, COOKING / "eval.jsonl", tokens=1024, chunk_tokens=256, task_share=0.5).chunks
    with tempfile.TemporaryDirectory() as scratch:
        probe = ProbeModel(fp32, Path(scratch), threads=THREADS)
        weights = probe.layout.weights
        ref = [log_softmax(probe.logits(c, {w: probe.fp32[w] for w in weights.values()})) for c in held]

        def held_out(levels: dict[str, str]) -> float:
            int4 = {weights[n]: fake_quant(probe.fp32[weights[n]], 4) for n, lv in levels.items() if lv == "int4"}
            rows = [kl_divergence(r, log_softmax(probe.logits(c, int4))) for r, c in zip(ref, held)]
            return float(np.concatenate(rows).mean())

        kld = {m: held_out(read_plan(d, {"max_size_ratio": 1.15}, "test")["levels"]) for m, d in sweeps.items()}
    assert kld["proxy"] <= 1.10 * kld["exact"], kld
