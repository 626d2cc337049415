"""Mixed precision under a size budget: per-tensor types from a measured sensitivity sweep, planned by an
exact knapsack, written by llama.cpp through tt_overrides; on a tiny llama with the real tokenizer."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import ConfigError

from .cli import run_edgeft
from .cores import THREADS
from .tiny import held_out_kld, make_uneven_tiny_llama, tiny_build_config

COOKING = Path(__file__).resolve().parent.parent / "examples" / "cooking"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- planning (no llama.cpp)


def test_types_fall_back_within_their_size_class_and_mixes_are_checked():
    from edgeft.formats.gguf.layout import group_of, resolve, tensor_bytes
    from edgeft.formats.gguf.mixed import TENSOR_TYPES, check_mix

    assert resolve("Q4_K", 1536) == "Q4_K" and resolve("Q4_K", 576) == "Q4_0"
    assert resolve("Q5_K", 576) == "Q5_0" and resolve("Q6_K", 576) == "Q8_0" and resolve("IQ4_XS", 576) == "IQ4_NL"
    assert resolve("Q8_0", 40) == "F16"  # no block type tiles a 40-wide row
    assert tensor_bytes((576, 1536), "Q4_0") == 576 * 1536 // 32 * 18
    assert tensor_bytes((1536, 576), "Q6_K") == 1536 * 576 // 256 * 210
    assert group_of("blk.3.attn_q.weight") == "blk.3.attn" and group_of("blk.3.ffn_down.weight") == "blk.3.ffn"
    assert group_of("token_embd.weight") == "token_embd" and group_of("output.weight") == "output"
    assert check_mix(["Q4_K", "Q5_K", "Q8_0"], "t") == ("Q4_K", "Q5_K", "Q8_0")
    # the table is ordered by bits per weight (what a mix's order is checked against), read from
    # gguf-py's block sizes: llama.cpp's published 4.5 (Q4_K) and 6.5625 (Q6_K)
    bits = [b for _, b in TENSOR_TYPES.values()]
    assert bits == sorted(bits) and TENSOR_TYPES["Q4_K"] == (12, 4.5) and TENSOR_TYPES["Q6_K"] == (14, 6.5625)
    for bad, msg in [
        (["Q8_0", "Q4_0"], "fewest to most bits"),
        (["Q4_0"], "two or more"),
        (["Q4_0", "Q9_9"], "unknown tensor type 'Q9_9'"),
        ("Q4_0", "a list"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            check_mix(bad, "t")


def _toy_sensitivity(rng: np.random.Generator, n_groups: int) -> dict:
    groups = []
    for g in range(n_groups):
        size = int(rng.integers(1000, 5000))
        cost_low = float(rng.uniform(0, 1))
        groups.append(
            {
                "name": f"g{g}",
                "tensors": [f"g{g}"],
                "options": [
                    {"level": "Q4_0", "bytes": size, "added_kld": cost_low},
                    {"level": "Q5_0", "bytes": int(size * 1.22), "added_kld": cost_low * float(rng.uniform(0.1, 0.6))},
                    {"level": "Q8_0", "bytes": int(size * 1.9), "added_kld": 0.0},
                ],
            }
        )
    return {"mix": ["Q4_0", "Q5_0", "Q8_0"], "fixed_bytes": 500, "groups": groups}


def test_the_plan_is_the_cheapest_assignment_that_fits():
    """Against brute force over every assignment of a small problem, for budgets across the range."""
    from edgeft.precision_plan import plan

    rng = np.random.default_rng(0)
    for _ in range(6):
        sens = _toy_sensitivity(rng, 5)
        lo = 500 + sum(g["options"][0]["bytes"] for g in sens["groups"])
        hi = 500 + sum(g["options"][2]["bytes"] for g in sens["groups"])
        for budget in np.linspace(lo, hi, 7).astype(int):
            best = min(
                (sum(o["added_kld"] for o in combo), combo)
                for combo in itertools.product(*(g["options"] for g in sens["groups"]))
                if 500 + sum(o["bytes"] for o in combo) <= budget
            )
            got = plan(sens, int(budget), units=100_000)
            assert got["predicted_bytes"] <= budget
            assert got["predicted_added_kld"] == pytest.approx(best[0], abs=1e-12)


def test_a_budget_no_mix_meets_is_one_clear_error():
    from edgeft.precision_plan import plan

    sens = _toy_sensitivity(np.random.default_rng(1), 4)
    with pytest.raises(ConfigError, match=r"max_size_mb = 0\.001: the smallest file this mix can make is .* MB"):
        plan(sens, 1000)


def test_probe_tokens_shrink_with_the_model_and_layers_are_probed_in_runs(tokenizer):
    from edgeft.calibration import build_set
    from edgeft.formats.gguf.mixed import Layout, multiplied_weights, probe_set
    from edgeft.formats.gguf.sweep import depth_blocks

    calib = build_set("task", tokenizer, COOKING / "train.jsonl", tokens=8192, chunk_tokens=512, task_share=0.5)
    calib = calib.spread(2048)

    def layout(params: int, untied: bool) -> Layout:
        shapes = {"token_embd.weight": (1000, params // 2000), "blk.0.attn_q.weight": (1000, params // 2000)}
        return Layout(shapes | ({"output.weight": (1000, params // 2000)} if untied else {}), 0, {})

    assert multiplied_weights(layout(10**9, untied=True)) == 10**9  # the looked-up embedding is free
    assert probe_set(calib, multiplied_weights(layout(135 * 10**6, untied=False))) is calib
    assert probe_set(calib, multiplied_weights(layout(10**9, untied=True))) is calib
    assert probe_set(calib, multiplied_weights(layout(3 * 10**9, untied=True))).chunks.shape == (1, 512)
    assert depth_blocks(1) == [[0]] and depth_blocks(3) == [[0], [1, 2]]
    blocks = depth_blocks(30)
    assert blocks[0] == [0] and sum(blocks, []) == list(range(30)) and {len(b) for b in blocks[1:]} <= {4, 5}


# ---------------------------------------------------------------- the sweep and the file (llama.cpp)


@pytest.fixture(scope="module")
def uneven_llama(tmp_path_factory, tokenizer) -> dict:
    """A tiny llama whose groups differ in sensitivity (see make_uneven_tiny_llama)."""
    from edgeft.calibration import build_set
    from edgeft.formats.gguf.export import export

    root = tmp_path_factory.mktemp("mixed")
    hf = make_uneven_tiny_llama(
        root / "hf", tokenizer, seed=2, loud=8, hidden=256, intermediate=512, layers=3, heads=4, kv_heads=2
    )
    calib = build_set("task", tokenizer, COOKING / "train.jsonl", tokens=2048, chunk_tokens=128, task_share=0.5)
    return {"hf": hf, "f32": export(hf, root / "f32", "f32").path, "calib": calib.spread(512)}


def _held_out_kld(f32: Path, q: Path, tokenizer) -> float:
    from edgeft.runtimes.llamacpp import LlamaCppRuntime

    a, b = LlamaCppRuntime(f32, n_threads=THREADS), LlamaCppRuntime(q, n_threads=THREADS)
    try:
        return held_out_kld(a, b, tokenizer, 10)
    finally:
        a.close()
        b.close()


@pytest.mark.slow
def test_sweep_plan_and_file_agree_and_beat_the_opposite_plan(uneven_llama, tokenizer, tmp_path):
    from edgeft.formats.gguf.inspect import read_gguf
    from edgeft.formats.gguf.layout import Layout, assign
    from edgeft.formats.gguf.mixed import SENSITIVITY_FILE, sensitivity_stage
    from edgeft.formats.gguf.quantize import quantize

    mix = ("Q4_0", "Q8_0")
    sens_dir = sensitivity_stage(
        uneven_llama["f32"], tmp_path / "sens", uneven_llama["calib"], mix, threads=THREADS
    ).path
    sens = json.loads((sens_dir / SENSITIVITY_FILE).read_text())
    layout = Layout.of(uneven_llama["f32"] / "model.gguf")
    assert [g["name"] for g in sens["groups"]] == list(layout.groups)
    assert set(layout.groups) == {"token_embd", *(f"blk.{i}.{k}" for i in range(3) for k in ("attn", "ffn"))}
    assert sens["probes"] == 1 + len(layout.groups) and sens["method"] == "exact"  # 3 layers: cheaper than roles
    added = {g["name"]: g["options"][0]["added_kld"] for g in sens["groups"]}
    assert all(g["options"][1]["added_kld"] == 0 for g in sens["groups"])  # the highest type is the baseline
    assert max(added.values()) > 3 * min(added.values())  # groups differ: there is something to choose

    # a budget with room for about half the groups at Q8_0
    low = layout.fixed_bytes + sum(layout.nbytes(layout.types(g, "Q4_0")) for g in layout.groups)
    high = layout.fixed_bytes + sum(layout.nbytes(layout.types(g, "Q8_0")) for g in layout.groups)
    max_mb = (low + 0.5 * (high - low)) / 1e6
    q = quantize(
        uneven_llama["f32"], tmp_path / "mixed", "Q4_0", threads=THREADS, sensitivity_dir=sens_dir, max_size_mb=max_mb
    )
    planned = q.manifest["results"]["mixed"]
    assert q.manifest["results"]["size_bytes"] <= max_mb * 1e6
    written = {t.name: t.tensor_type.name for t in read_gguf(q.path / "model.gguf").tensors if len(t.shape) >= 2}
    assert written == assign(layout, planned["levels"])
    assert {"Q4_0", "Q8_0"} == set(written.values())  # the budget forced a real mix
    # the written file scored on the sweep's tokens: the exact probes' sum predicts it closely
    assert planned["measured_kld"] == pytest.approx(planned["predicted_kld"], rel=0.25)

    # the opposite plan: the groups the plan kept at Q8_0 go to Q4_0 and as many others as fit go up
    kept_high = [g for g, lvl in planned["levels"].items() if lvl == "Q8_0"]
    opposite = {g: "Q4_0" for g in layout.groups}
    room = max_mb * 1e6 - layout.fixed_bytes - sum(layout.nbytes(layout.types(g, "Q4_0")) for g in layout.groups)
    for g in sorted((g for g in layout.groups if g not in kept_high), key=lambda g: added[g]):
        extra = layout.nbytes(layout.types(g, "Q8_0")) - layout.nbytes(layout.types(g, "Q4_0"))
        if extra <= room:
            opposite[g], room = "Q8_0", room - extra
    from edgeft.formats.gguf.quantize import quantize_file

    quantize_file(
        uneven_llama["f32"] / "model.gguf", tmp_path / "opposite.gguf", "Q4_0", 2, tensor_types=assign(layout, opposite)
    )
    assert (tmp_path / "opposite.gguf").stat().st_size <= max_mb * 1e6
    f32 = uneven_llama["f32"] / "model.gguf"
    kld_plan = _held_out_kld(f32, q.path / "model.gguf", tokenizer)
    kld_opposite = _held_out_kld(f32, tmp_path / "opposite.gguf", tokenizer)
    assert kld_plan < kld_opposite, (kld_plan, kld_opposite)


@pytest.mark.slow
def test_same_inputs_give_a_byte_identical_mixed_gguf(uneven_llama, tmp_path):
    from edgeft.formats.gguf.mixed import sensitivity_stage
    from edgeft.formats.gguf.quantize import quantize

    files = []
    for run in ("a", "b"):
        mix = ("Q4_K", "Q8_0")
        sens = sensitivity_stage(
            uneven_llama["f32"], tmp_path / run / "sens", uneven_llama["calib"], mix, threads=THREADS, method="proxy"
        )
        q = quantize(
            uneven_llama["f32"],
            tmp_path / run / "q",
            "Q4_K_M",
            threads=THREADS,
            sensitivity_dir=sens.path,
            max_size_mb=30,
        )
        written = sorted(p.name for p in sens.path.iterdir() if p.name != "manifest.json")
        assert written == [
            "reference-tokens.npy",
            "reference-topk-ids.npy",
            "reference-topk-logp.npy",
            "sensitivity.json",
        ]
        files.append([_sha(sens.path / name) for name in written] + [_sha(q.path / "model.gguf")])
    assert files[0] == files[1]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('quant = "Q4_K_M"\nmix = ["Q4_K", "Q8_0"]\n', "x.toml: mix: needs max_size_mb"),
        ('quant = "Q4_K_M"\nmax_size_mb = -3\n', "x.toml: max_size_mb: expected a positive number"),
        ('quant = "Q4_K_M"\nmax_size_mb = "95"\n', "x.toml: max_size_mb: expected a positive number"),
        ('quant = "F16"\nmax_size_mb = 95\n', "x.toml: max_size_mb: quant F16 is not quantized"),
        ('quant = "Q4_K_M"\nmax_size_mb = 95\nmix = ["Q8_0", "Q4_K"]\n', "x.toml: mix: list the types from fewest"),
    ],
)
def test_mixed_target_fields_are_checked(tmp_path, monkeypatch, body, message):
    from edgeft.targets import get_target

    monkeypatch.setenv("EDGEFT_TARGETS", str(tmp_path))
    (tmp_path / "x.toml").write_text('format = "gguf"\n' + body)
    with pytest.raises(ConfigError, match=message):
        get_target("x")


@pytest.mark.slow
def test_a_mixed_target_builds_and_an_impossible_budget_stops_before_the_sweep(tmp_path, tokenizer):
    """Through `edgeft build` on a tiny model: the row, the plan in the manifest; then a budget below
    the all-lowest file is one line, exit 2, before any calibration stage runs."""
    cfg = tiny_build_config(
        tmp_path,
        tokenizer,
        "max_steps = 2\nbatch_size = 4\nmax_seq_len = 64\nrank = 4\nvalidation_share = 0\n",
        extra="[calibration]\ntokens = 512\nchunk_tokens = 128\nsensitivity_tokens = 256\n",
    )
    target = tmp_path / "tiny-mixed.toml"
    target.write_text('format = "gguf"\nquant = "Q4_0"\nmix = ["Q4_0", "Q8_0"]\nmax_size_mb = 4.5\n')
    out = tmp_path / "build"

    def build(*extra):
        return run_edgeft(["build", "--config", cfg, "--target", target, "--out", out, *extra], timeout=900)

    proc = build()
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    results = json.loads((out / "tiny-mixed" / "manifest.json").read_text())["results"]
    assert results["size_bytes"] <= 4.5e6 and results["mixed"]["predicted_bytes"] <= 4.5e6
    assert set(results["tensor_types"]) >= {"Q4_0", "Q8_0"}
    assert (out / "sensitivity-q4_0-q8_0" / "sensitivity.json").is_file()
    rows = {r["stage"]: r for r in json.loads((out / "report.json").read_text())["ladder"]}
    assert rows["tiny-mixed"]["kl_divergence_mean"] >= 0

    target.write_text('format = "gguf"\nquant = "Q4_0"\nmix = ["Q4_0", "Q8_0"]\nmax_size_mb = 1\n')
    (out / "sensitivity-q4_0-q8_0").rename(tmp_path / "old-sweep")
    proc = build()
    assert proc.returncode == 2
    # cached stages report themselves on stderr; the error is one line, the last
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("edgeft: error")]
    assert len(lines) == 1 and proc.stderr.strip().endswith(lines[0])
    assert "--target tiny-mixed: max_size_mb = 1: the smallest file this mix can make is" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "sensitivity-q4_0-q8_0").exists()


# ---------------------------------------------------------------- the sweep's parts (llama.cpp, tiny model)


@pytest.mark.slow
def test_a_probe_assembled_from_level_files_is_byte_identical_to_llama_cpps_own_mix(uneven_llama, tmp_path):
    """llama.cpp quantizes each tensor on its own: copying tensors out of files quantized with every
    tensor at one type gives exactly the file llama.cpp writes for the mix (importance matrix too)."""
    from edgeft.formats.gguf.levels import GGUFFile, assemble
    from edgeft.formats.gguf.mixed import Layout
    from edgeft.formats.gguf.quantize import quantize_file

    f32 = uneven_llama["f32"] / "model.gguf"
    layout = Layout.of(f32)
    rng = np.random.default_rng(0)
    matrix = {n: rng.uniform(0.1, 4, layout.shapes[n][0]).astype(np.float32) for n in layout.shapes}
    mix = ("Q4_K", "Q5_0", "Q8_0")
    levels = {}
    for level in mix:
        types = {n: t for g in layout.groups for n, t in layout.types(g, level).items()}
        quantize_file(f32, tmp_path / f"{level}.gguf", "Q8_0", 2, imatrix=matrix, tensor_types=types)
        levels[level] = GGUFFile(tmp_path / f"{level}.gguf")
    picks = {g: mix[i % 3] for i, g in enumerate(layout.groups)}
    wanted = {n: t for g, lv in picks.items() for n, t in layout.types(g, lv).items()}
    quantize_file(f32, tmp_path / "direct.gguf", "Q8_0", 2, imatrix=matrix, tensor_types=wanted)
    sources = {n: levels[lv] for g, lv in picks.items() for n in layout.groups[g]}
    assemble(levels["Q8_0"], sources, tmp_path / "assembled.gguf")
    assert len(set(wanted.values())) == 3
    assert _sha(tmp_path / "assembled.gguf") == _sha(tmp_path / "direct.gguf")


@pytest.mark.slow
def test_ggml_dequantizes_level_tensors_as_gguf_py_does(uneven_llama, tmp_path):
    import gguf
    from gguf.quants import dequantize

    from edgeft.formats.gguf.levels import GGUFFile, dequantized_rows, weighted_errors
    from edgeft.formats.gguf.mixed import Layout
    from edgeft.formats.gguf.quantize import quantize_file

    f32 = uneven_llama["f32"] / "model.gguf"
    layout = Layout.of(f32)
    exact = GGUFFile(f32)
    for level in ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0"):
        types = {n: t for g in layout.groups for n, t in layout.types(g, level).items()}
        quantize_file(f32, tmp_path / "l.gguf", "Q8_0", 2, tensor_types=types)
        file = GGUFFile(tmp_path / "l.gguf")
        for name in ("blk.0.attn_q.weight", "blk.2.ffn_down.weight"):
            t = file.tensors[name]
            ours = np.concatenate([v.copy() for _, v in dequantized_rows(t, max_values=3000)])
            theirs = dequantize(t.read().reshape(ours.shape[0], -1), gguf.GGMLQuantizationType(t.type))
            np.testing.assert_array_equal(ours, theirs)
            err = weighted_errors(exact.tensors[name], t)
            w = exact.tensors[name].read().view(np.float32).reshape(ours.shape)
            np.testing.assert_allclose(err.columns, ((theirs - w) ** 2).sum(0), rtol=1e-5)
            assert err.rows.sum() == pytest.approx(err.columns.sum(), rel=1e-9)


@pytest.mark.slow
def test_scorer_logits_and_activation_statistics_match_llama_cpp_python_and_torch(uneven_llama):
    """The in-place logits view equals LlamaCppRuntime's copy, observing the inputs changes nothing,
    and the inputs' mean squares llama.cpp saw are those torch's imatrix collector sees."""
    from edgeft.formats.gguf.imatrix import collect
    from edgeft.formats.gguf.mixed import Layout
    from edgeft.formats.gguf.scoring import ActivationStats, Scorer
    from edgeft.runtimes.llamacpp import LlamaCppRuntime

    f32 = uneven_llama["f32"] / "model.gguf"
    chunks = uneven_llama["calib"].chunks[:2]
    layout = Layout.of(f32)
    stats = ActivationStats({n: s[0] for n, s in layout.shapes.items()})
    with Scorer(f32, chunks.shape[1], 2, observe=stats) as observed, Scorer(f32, chunks.shape[1], 2) as plain:
        rt = LlamaCppRuntime(f32, n_threads=THREADS, n_ctx=int(chunks.shape[1]))
        try:
            for chunk in chunks:
                a = np.array(observed.logits(chunk))
                np.testing.assert_array_equal(a, plain.logits(chunk))
                np.testing.assert_array_equal(a, rt.logits([int(t) for t in chunk]))
        finally:
            rt.close()
    means = stats.mean_squares()
    assert set(means) == set(layout.shapes)  # every layer weight, and the tied head as token_embd
    assert stats.counts["token_embd.weight"] == chunks.size
    torch_side = collect(uneven_llama["hf"], f32, chunks, threads=THREADS)
    for name, (sums, count) in torch_side.items():
        assert count == chunks.size
        # llama.cpp keeps its KV cache in f16: on this loud model the figures agree to a percent or two
        assert np.linalg.norm(means[name] - sums / count) <= 0.03 * np.linalg.norm(sums / count), name


@pytest.mark.slow
def test_top_k_kld_is_a_lower_bound_that_orders_probes_as_the_full_kld(uneven_llama, tmp_path):
    """Per position the top-k figure never exceeds the full KL divergence and equals it with k = vocab;
    over probes that each lower one group, it ranks the probes as the full figure does."""
    from edgeft.formats.gguf.mixed import Layout
    from edgeft.formats.gguf.quantize import quantize_file
    from edgeft.formats.gguf.scoring import Scorer, TopKReference

    f32 = uneven_llama["f32"] / "model.gguf"
    layout = Layout.of(f32)
    top = {n: t for g in layout.groups for n, t in layout.types(g, "Q8_0").items()}
    chunks = uneven_llama["calib"].chunks[:2]
    with Scorer(f32, chunks.shape[1], 2) as ref:
        exact = [np.array(ref.logits(c), dtype=np.float64) for c in chunks]
    vocab = exact[0].shape[1]
    references = {k: TopKReference(k) for k in (256, vocab)}
    for logits in exact:
        for r in references.values():
            r.add(logits.astype(np.float32))
        logits -= np.logaddexp.reduce(logits, axis=1, keepdims=True)
    figures = {}
    for group in ("token_embd", "blk.0.attn", "blk.1.attn", "blk.2.ffn", None):
        types = {**top, **(layout.types(group, "Q4_0") if group else {})}
        quantize_file(f32, tmp_path / "q.gguf", "Q8_0", 2, tensor_types=types)
        full, by_k = [], {k: [] for k in references}
        with Scorer(tmp_path / "q.gguf", chunks.shape[1], 2) as q:
            for i, chunk in enumerate(chunks):
                lq = np.array(q.logits(chunk), dtype=np.float64)
                for k, r in references.items():
                    by_k[k].append(r.kld(i, lq.astype(np.float32)))
                lq -= np.logaddexp.reduce(lq, axis=1, keepdims=True)
                full.append((np.exp(exact[i]) * (exact[i] - lq)).sum(1))
        full = np.concatenate(full)
        top_k, all_k = np.concatenate(by_k[256]), np.concatenate(by_k[vocab])
        assert (top_k <= full + 1e-9).all()  # merging the tail into one bin only lowers KL
        np.testing.assert_allclose(all_k, full, rtol=1e-5, atol=1e-5)  # log-probs stored as float32
        figures[group] = (full.mean(), top_k.mean())
    base = figures.pop(None)
    added = {g: (f - base[0], t - base[1]) for g, (f, t) in figures.items()}
    print(added)
    assert sorted(added, key=lambda g: added[g][0]) == sorted(added, key=lambda g: added[g][1])


@pytest.mark.slow
def test_the_proxy_orders_layer_groups_like_the_end_to_end_probes(uneven_llama, tmp_path):
    """On the uneven tiny llama, the predicted added KLD of each layer group (local errors calibrated by
    role and depth probes) ranks the groups as probing each one alone does."""
    from edgeft.formats.gguf.sweep import measure

    mix = ("Q4_0", "Q8_0")
    f32 = uneven_llama["f32"] / "model.gguf"
    runs = {
        m: measure(f32, uneven_llama["calib"].chunks, mix, tmp_path / m, threads=THREADS, method=m)
        for m in ("exact", "proxy")
    }
    low = {m: {g["name"]: g["options"][0]["added_kld"] for g in r["groups"]} for m, r in runs.items()}
    layers = [g for g in low["exact"] if g.startswith("blk.")]
    proxy = runs["proxy"]
    assert proxy["probes"] == 1 + 1 + 7 + 2  # base, the embedding, one per role, layer 0 and layers 1-2
    assert {g["name"]: g["options"][0]["source"] for g in proxy["groups"]} == {
        g: "probe" if g == "token_embd" else "proxy" for g in low["exact"]
    }
    assert low["proxy"]["token_embd"] == low["exact"]["token_embd"]  # measured alike
    rank = {m: np.argsort(np.argsort([low[m][g] for g in layers])) for m in low}
    assert np.corrcoef(rank["exact"], rank["proxy"])[0, 1] >= 0.8, low
    assert max(layers, key=low["exact"].get) == max(layers, key=low["proxy"].get)
    # the fit reproduces every role probe; the loud layer 1 reads its inputs loud, but layer 0's rounding
    # is what travels furthest here: the depth factors carry that
    for row in proxy["calibration"]:
        if row["probe"].startswith("role:"):
            assert row["fitted_kld"] == pytest.approx(max(0.0, row["added_kld"]), rel=1e-6)
    depth = {c["probe"].split("@")[0]: c["depth_factor"] for c in proxy["calibration"] if "depth_factor" in c}
    assert depth["depth:0-0"] > depth["depth:1-2"]
