"""Benchmark discipline on a phone or a board, against a fake /sys: big-core pinning on big.LITTLE
CPUs, temperature and clocks recorded where readable and absent (never an error) where not, and the
sustained decode's first and last parts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeft.bench.device_state import big_cores, cpu_capacities, pin_big_cores, snapshot
from edgeft.bench.latency import measure_sustained
from edgeft.runtimes.base import Generation


def fake_sysfs(
    root: Path, capacities: list[int] | None, temps: dict[str, int] | None = None, khz: list[int] | None = None
) -> Path:
    """A /sys with CPUs of the given capacities (None: files absent), thermal zones and clocks."""
    cpu = root / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "cpufreq").mkdir()  # siblings the kernel has that are not CPUs
    (cpu / "possible").write_text("0-7\n")
    n = len(capacities) if capacities is not None else len(khz or [])
    for i in range(n):
        d = cpu / f"cpu{i}"
        (d / "cpufreq").mkdir(parents=True)
        if capacities is not None:
            (d / "cpu_capacity").write_text(f"{capacities[i]}\n")
        if khz is not None:
            (d / "cpufreq/scaling_cur_freq").write_text(f"{khz[i]}\n")
    for i, (kind, milli) in enumerate((temps or {}).items()):
        z = root / f"sys/class/thermal/thermal_zone{i}"
        z.mkdir(parents=True)
        (z / "type").write_text(kind + "\n")
        (z / "temp").write_text(f"{milli}\n")
    return root


PHONE = [250, 250, 250, 250, 800, 800, 800, 1024]  # 4 little, 3 big, 1 prime


@pytest.mark.parametrize(
    ("caps", "threads", "chosen"),
    [
        (PHONE, 4, [7, 4, 5, 6]),  # prime first, then the big tier
        (PHONE, 1, [7]),
        (PHONE, 5, None),  # would need a little core
        ([1024] * 4, 4, None),  # a Pi 5: all alike
        ({}, 4, None),
    ],
)
def test_big_cores_are_the_fastest_tiers_never_the_slowest(caps, threads, chosen):
    capacities = dict(enumerate(caps)) if isinstance(caps, list) else caps
    assert big_cores(capacities, threads)[0] == chosen


def test_pinning_on_a_big_little_cpu_records_what_it_did(tmp_path, monkeypatch):
    root = fake_sysfs(tmp_path, PHONE)
    assert cpu_capacities(root) == dict(enumerate(PHONE))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    calls = []
    state = pin_big_cores(4, root, setaffinity=lambda pid, cpus: calls.append((pid, cpus)))
    assert calls == [(0, {4, 5, 6, 7})]
    assert state["big_little"] is True and state["pinned_to"] == [7, 4, 5, 6] and "4 fastest of 8" in state["why"]
    assert state["capacities"]["7"] == 1024


def test_pinning_is_skipped_with_a_reason_never_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)  # big cores not ours
    root = fake_sysfs(tmp_path / "a", PHONE)
    state = pin_big_cores(2, root, setaffinity=lambda pid, cpus: pytest.fail("must not pin"))
    assert state["pinned_to"] is None and "only 0 big cores" in state["why"]
    assert pin_big_cores(4, fake_sysfs(tmp_path / "b", [1024] * 4))["big_little"] is False
    absent = pin_big_cores(4, tmp_path / "nothing")
    assert absent == {"big_little": None, "capacities": None, "pinned_to": None, "why": "cpu_capacity not readable"}

    def refuse(pid, cpus):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    refused = pin_big_cores(1, fake_sysfs(tmp_path / "c", PHONE), setaffinity=refuse)
    assert refused["pinned_to"] is None and "pinning refused" in refused["why"]


def test_snapshot_reads_temperatures_and_clocks_and_records_absence(tmp_path):
    root = fake_sysfs(
        tmp_path / "pi", [1024] * 4, {"cpu-thermal": 61_250, "gpu": 50_000}, [2_400_000] * 3 + [1_500_000]
    )
    snap = snapshot(root)
    assert snap["temperature_c"] == {
        "thermal_zone0": {"type": "cpu-thermal", "c": 61.25},
        "thermal_zone1": {"type": "gpu", "c": 50.0},
    }
    assert snap["cpu_mhz"] == {"cpu0": 2400.0, "cpu1": 2400.0, "cpu2": 2400.0, "cpu3": 1500.0}
    assert snapshot(tmp_path / "empty") == {"temperature_c": None, "cpu_mhz": None}
    broken = fake_sysfs(tmp_path / "broken", [1024], {"x": 1})
    (broken / "sys/class/thermal/thermal_zone0/temp").write_text("not a number")
    (broken / "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq").mkdir()  # unreadable as a file
    assert snapshot(broken) == {"temperature_c": None, "cpu_mhz": None}


class FakeRuntime:
    """Decodes at a speed that drops as it 'heats', on a clock the test controls."""

    name, version, threads, n_ctx = "fake", "0", 1, 512

    def __init__(self, clock: list[float], speeds: list[float]):
        self.clock, self.speeds, self.calls = clock, speeds, 0

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return [ord(c) % 50 for c in text]

    def render_chat(self, messages) -> str:
        return "<" + messages[-1]["content"] + ">"

    def logits(self, tokens):
        return None

    def generate(self, messages, max_new_tokens: int, ignore_eos: bool = False) -> Generation:
        speed = self.speeds[min(self.calls, len(self.speeds) - 1)]
        self.calls += 1
        decode_s = (max_new_tokens - 1) / speed
        self.clock[0] += 0.1 + decode_s
        return Generation("", 10, max_new_tokens, False, 0.1, 0.1 + decode_s)


def test_sustained_decode_reports_the_first_and_last_part_apart(tmp_path):
    clock = [0.0]
    rt = FakeRuntime(clock, [100.0] * 5 + [75.0] * 5 + [50.0])  # cool, warm, throttled
    root = fake_sysfs(tmp_path, [1024], {"soc": 70_000}, [1_800_000])
    out = measure_sustained(rt, 20.0, chunk_tokens=101, prompt_tokens=60, root=root, clock=lambda: clock[0])
    assert out["chunk_tokens"] == 101 and out["tokens"] == 100 * len(out["series"])
    assert out["seconds"] >= 20.0 and len(out["series"]) >= 12
    assert out["first"]["tok_s"] == pytest.approx(100.0) and out["last"]["tok_s"] == pytest.approx(50.0)
    assert out["first"]["tokens"] >= 0.2 * out["tokens"] and out["change_pct"] == pytest.approx(-50.0)
    assert out["series"][0]["temperature_c"] == 70.0 and out["series"][0]["cpu_mhz"] == 1800.0


def test_a_short_sustained_run_still_compares_two_chunks(tmp_path):
    clock = [0.0]
    out = measure_sustained(FakeRuntime(clock, [100.0, 50.0]), 0.01, chunk_tokens=33, prompt_tokens=60,
                            root=tmp_path, clock=lambda: clock[0])  # fmt: skip
    assert len(out["series"]) == 2 and out["first"]["chunks"] == out["last"]["chunks"] == 1
    assert out["series"][0]["temperature_c"] is None  # nothing readable: absent, not an error
    assert out["first"]["tok_s"] == pytest.approx(100.0) and out["last"]["tok_s"] == pytest.approx(50.0)


def test_report_md_lists_cpu_state_and_sustained_decode_only_when_recorded():
    from edgeft.report import _cpu_state_section

    def target(name, state, sustained=None):
        return {"target": name, "latency": {"device_state": state, "sustained": sustained}}

    hot = {"temperature_c": {"thermal_zone0": {"type": "soc", "c": 71.0}}, "cpu_mhz": {"cpu4": 2800.0}}
    cool = {"temperature_c": {"thermal_zone0": {"type": "soc", "c": 48.0}}, "cpu_mhz": {"cpu4": 3000.0}}
    sus = {"first": {"tok_s": 40.0}, "last": {"tok_s": 30.0}, "change_pct": -25.0, "seconds": 120.0, "tokens": 4000}
    rows = _cpu_state_section(
        [
            target("gguf-q4", {"affinity": {"pinned_to": [4, 5]}, "before": cool, "after": hot}, sus),
            target("gguf-q8", {"affinity": {"pinned_to": None}, "before": {}, "after": {}}),
        ]
    )
    text = "\n".join(rows)
    assert "| gguf-q4 | cores 4,5 | 48 → 71 | 3000 → 2800 | 40.0 → 30.0 (-25%, 120 s) |" in text
    assert "gguf-q8" not in text  # nothing recorded: no row
    assert _cpu_state_section([target("x", None)]) == []  # stages cached before this was recorded


def test_sustained_is_a_bench_setting_that_leaves_cached_stages_valid_when_off():
    from edgeft.bench.run import _params
    from edgeft.config import BenchConfig
    from edgeft.errors import ConfigError

    assert "sustained_s" not in _params(BenchConfig())  # stage keys as before the option existed
    assert _params(BenchConfig(sustained_s=30))["sustained_s"] == 30
    with pytest.raises(ConfigError, match=r"\[bench\].sustained_s"):
        BenchConfig(sustained_s=-1)
