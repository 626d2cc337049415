"""edgeft.bench.latency, .probe and .bandwidth on a tiny random llama (hidden 64) with the real
SmolLM2 tokenizer, exported to GGUF. No timing is asserted beyond being positive and ordered."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgeft.bench.bandwidth import decode_roofline, measure_read_bandwidth
from edgeft.bench.latency import measure_latency
from edgeft.bench.probe import run_probe
from edgeft.errors import EdgeftError
from edgeft.formats.gguf.inspect import bytes_per_token as gguf_bytes_per_token

from .cores import THREADS
from .tiny import make_tiny_llama

pytest.importorskip("llama_cpp")

HIDDEN = 64


@pytest.fixture(scope="module")
def tied_and_untied(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict[str, Path]:
    """HF folders and f32 GGUF files of a tied and an untied tiny llama."""
    from edgeft.formats.gguf.export import write_gguf

    root = tmp_path_factory.mktemp("tiny-latency")
    paths: dict[str, Path] = {}
    for kind in ("tied", "untied"):
        folder = make_tiny_llama(root / kind, tokenizer, hidden=HIDDEN, tied=kind == "tied")
        write_gguf(folder, root / f"{kind}.gguf", "f32")
        paths[kind], paths[f"{kind}.gguf"] = folder, root / f"{kind}.gguf"
    return paths


@pytest.fixture(scope="module")
def runtime(tied_and_untied: dict[str, Path]) -> Iterator:
    from edgeft.runtimes.llamacpp import LlamaCppRuntime

    rt = LlamaCppRuntime(tied_and_untied["tied.gguf"], n_threads=1, n_ctx=512, scoring=False)
    yield rt
    rt.close()


def test_runtime_without_a_thread_count_uses_the_cores_this_process_may_use(tied_and_untied) -> None:
    """Not llama-cpp-python's defaults (half the machine's CPUs to decode, all of them for prompts),
    which ignore a container's CPU set: on 2 cores one of the two counts differs from ours, alone or
    under a worker pinned to one core."""
    from edgeft.machine import usable_cores
    from edgeft.runtimes.llamacpp import LlamaCppRuntime

    rt = LlamaCppRuntime(tied_and_untied["tied.gguf"], n_ctx=128, scoring=False)
    try:
        assert rt.n_threads == rt._llm.n_threads_batch == usable_cores()
    finally:
        rt.close()


def _check_spread(s: dict, n: int) -> None:
    assert s["n"] == n
    assert 0 < s["min"] <= s["median"] <= s["max"]


@pytest.mark.slow
def test_measure_latency_hits_prompt_length_and_reports_spreads(runtime) -> None:
    result = measure_latency(runtime, prompt_tokens=128, decode_tokens=16, repeats=2)
    assert abs(result["prompt_tokens"] - 128) <= 8
    assert result["decode_tokens"] == 16 and result["repeats"] == 2
    assert result["runtime"] == "llama.cpp" and result["runtime_version"] and result["threads"] == 1
    for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s"):
        _check_spread(result[key], 2)


def test_measure_latency_rejects_prompt_beyond_context(runtime) -> None:
    with pytest.raises(EdgeftError, match="n_ctx=512"):
        measure_latency(runtime, prompt_tokens=500, decode_tokens=64, repeats=1)


def test_llamacpp_probe_runs_in_own_process_without_torch(tied_and_untied: dict[str, Path]) -> None:
    report = run_probe("llama.cpp", tied_and_untied["tied.gguf"], 1, prompt_tokens=64, decode_tokens=8, repeats=1)
    assert report["pid"] != os.getpid()
    assert report["runtime"] == "llama.cpp" and report["torch_imported"] is False
    assert report["peak_rss_bytes"] >= report["rss_after_load_bytes"] > 0
    assert report["load_s"] > 0
    assert abs(report["latency"]["prompt_tokens"] - 64) <= 8
    _check_spread(report["latency"]["decode_tok_s"], 1)


@pytest.mark.slow
def test_probe_pins_to_big_cores_records_cpu_state_and_decodes_sustained(
    tied_and_untied: dict[str, Path], tmp_path
) -> None:
    from .test_device_state import fake_sysfs

    # A fake /sys where the first core this process may use is "big" and every other core "little":
    # the probe pins itself to that core. (Under a pytest-xdist worker pinned to core 1, a fake big
    # CPU 0 would be outside the allowed set, and the probe rightly refuses to pin there.)
    big = min(os.sched_getaffinity(0))
    n = big + 2
    caps = [1024 if i == big else 512 for i in range(n)]
    khz = [2_400_000 if i == big else 1_800_000 for i in range(n)]
    root = fake_sysfs(tmp_path, caps, {"cpu-thermal": 55_000}, khz)
    report = run_probe(
        "llama.cpp", tied_and_untied["tied.gguf"], 1, prompt_tokens=64, decode_tokens=8, repeats=1,
        sustained_s=0.5, sysfs_root=root,
    )  # fmt: skip
    state = report["device_state"]
    assert state["affinity"]["big_little"] is True and state["affinity"]["pinned_to"] == [big]
    for when in ("before", "after"):
        assert state[when]["temperature_c"]["thermal_zone0"]["c"] == 55.0
        assert state[when]["cpu_mhz"] == {f"cpu{i}": k / 1000 for i, k in enumerate(khz)}
    sus = report["sustained"]
    assert sus["seconds"] >= 0.5 and len(sus["series"]) >= 2 and sus["first"]["tok_s"] > 0 < sus["last"]["tok_s"]
    plain = run_probe("llama.cpp", tied_and_untied["tied.gguf"], 1, prompt_tokens=64, decode_tokens=8, repeats=1)
    assert plain["sustained"] is None and set(plain["device_state"]) == {"affinity", "before", "after"}


@pytest.mark.slow
def test_probe_peak_rss_is_not_the_parents(tied_and_untied: dict[str, Path]) -> None:
    """A large parent must not leak its high-water mark into the probe (ru_maxrss survives exec)."""
    import psutil

    ballast = np.ones(1_500_000_000 // 8)  # 1.5 GB resident in this (parent) process
    parent_rss = psutil.Process().memory_info().rss
    report = run_probe("llama.cpp", tied_and_untied["tied.gguf"], 1, prompt_tokens=64, decode_tokens=8, repeats=1)
    assert parent_rss > 1.4e9
    assert report["peak_rss_bytes"] < parent_rss / 2
    del ballast


@pytest.mark.slow
def test_torch_probe(tied_and_untied: dict[str, Path]) -> None:
    report = run_probe("torch", tied_and_untied["tied"], 1, prompt_tokens=64, decode_tokens=8, repeats=1)
    assert report["pid"] != os.getpid() and report["torch_imported"] is True
    assert report["peak_rss_bytes"] >= report["rss_after_load_bytes"] > 0
    assert abs(report["latency"]["prompt_tokens"] - 64) <= 8
    _check_spread(report["latency"]["decode_tok_s"], 1)


def test_probe_of_missing_model_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(EdgeftError, match="nowhere.gguf"):
        run_probe("llama.cpp", missing, 1, prompt_tokens=64, decode_tokens=8, repeats=1, timeout=120)


def test_read_bandwidth_is_positive() -> None:
    result = measure_read_bandwidth(threads=THREADS, size_mb=16, repeats=3)
    assert result["threads"] == THREADS and result["size_mb"] == 16
    _check_spread(result["read_gb_s"], 3)
    assert decode_roofline(result["read_gb_s"]["median"], 10**6) > 0


def _tensor_bytes(path: Path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


# GGUFReader parses the 49k-token vocabulary in Python (~2 s a file), so each file is read once here.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_bytes_per_token_counts_embedding_rows_read(tied_and_untied: dict[str, Path], tokenizer, kind: str) -> None:
    """Tied: the embedding is the output layer, read whole. Untied: the lookup reads one row."""
    path = tied_and_untied[f"{kind}.gguf"]
    unread_rows = 0 if kind == "tied" else len(tokenizer) - 1
    row = HIDDEN * 4  # one f32 row of token_embd
    assert gguf_bytes_per_token(path) == _tensor_bytes(path) - unread_rows * row


def test_decode_roofline_is_bandwidth_over_bytes() -> None:
    assert decode_roofline(20.0, 500 * 10**6) == pytest.approx(40.0)


def test_a_probe_that_does_not_finish_is_an_internal_error_not_a_user_error(tmp_path):
    from edgeft.bench.probe import run_probe
    from edgeft.errors import InternalError

    with pytest.raises(InternalError, match="did not finish") as e:
        run_probe("torch", tmp_path, threads=1, prompt_tokens=64, decode_tokens=4, repeats=1, timeout=0.05)
    assert e.value.exit_code == 3


def test_the_probe_time_out_grows_with_the_model_and_the_tokens_timed(tmp_path):
    from edgeft.bench.probe import BASE_TIMEOUT_S, model_bytes, probe_timeout

    (tmp_path / "model.gguf").write_bytes(b"\0" * 1000)
    (tmp_path / "folder").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / "folder" / name).write_bytes(b"\0" * 300)
    assert model_bytes(tmp_path / "model.gguf") == 1000 and model_bytes(tmp_path / "folder") == 600
    # SmolLM2-sized models at the default lengths keep the old 900 s guard
    assert probe_timeout(538_000_000, 512, 128, 3) == BASE_TIMEOUT_S
    # the 1.5B's 7.1 GB fp32 reference gets ~6.6x, and twice the timed tokens twice that again
    big = probe_timeout(7_108_390_424, 512, 128, 3)
    assert big == pytest.approx(BASE_TIMEOUT_S * 7_108_390_424 / 2**30)
    assert probe_timeout(7_108_390_424, 1024, 256, 3) == pytest.approx(2 * big)
