"""What the CPU was doing around a timing: big-core pinning, temperature and clocks (Linux sysfs).

Phones and some boards mix fast and slow cores (big.LITTLE); a decode whose threads land on a slow
core runs at that core's pace, and a board that heats up lowers its clock. Before the timed runs
:func:`pin_big_cores` restricts the process to the fastest cores when the CPU has cores of different
capacity (``/sys/devices/system/cpu/cpu*/cpu_capacity``, which the kernel exposes on such CPUs) and
enough of them for the thread count, and :func:`snapshot` reads every thermal zone
(``/sys/class/thermal/thermal_zone*/temp``, millidegrees) and every CPU's current clock
(``cpufreq/scaling_cur_freq``, kHz); the bench result keeps one snapshot from before and one from after.

Nothing here raises: a file that is absent or unreadable (macOS, containers, a locked-down phone) is
recorded as absent (None). ``root`` is the file-system root the paths hang from, so tests use a fake one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

ROOT = Path("/")
_CPU = re.compile(r"cpu(\d+)$")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()[:64] or None
    except (OSError, UnicodeDecodeError):
        return None


def _cpus(root: Path) -> list[tuple[int, Path]]:
    folder = root / "sys/devices/system/cpu"
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    found = [(int(m.group(1)), p) for p in entries if (m := _CPU.match(p.name))]
    return sorted(found)


def cpu_capacities(root: Path = ROOT) -> dict[int, int]:
    """CPU number → capacity (1024 = the fastest core) for every CPU that reports one."""
    caps = {n: _read_int(p / "cpu_capacity") for n, p in _cpus(root)}
    return {n: c for n, c in caps.items() if c is not None and c > 0}


def big_cores(capacities: dict[int, int], threads: int) -> tuple[list[int] | None, str]:
    """The CPUs to pin ``threads`` threads to, and why: the fastest capacity tiers, taken from the top
    until they hold ``threads``; None when the cores are all alike, unknown, or only the slowest tier
    would make up the count (then pinning would not keep the threads off the slow cores)."""
    tiers = sorted(set(capacities.values()), reverse=True)
    if len(tiers) < 2:
        return None, "no cores of different capacity" if capacities else "cpu_capacity not readable"
    chosen: list[int] = []
    for tier in tiers[:-1]:  # never the slowest tier
        chosen += sorted(n for n, c in capacities.items() if c == tier)
        if len(chosen) >= threads:
            return chosen, f"{len(chosen)} fastest of {len(capacities)} cores (capacity ≥ {tier})"
    return None, f"{threads} threads need the slow cores too (only {len(chosen)} faster cores)"


def pin_big_cores(
    threads: int,
    root: Path = ROOT,
    setaffinity: Callable[[int, set[int]], None] | None = None,
) -> dict[str, Any]:
    """Restrict this process to the big cores when the CPU is big.LITTLE; what was done, and why.

    ``{"big_little": bool | None, "capacities": {cpu: capacity} | None, "pinned_to": [cpus] | None,
    "why": str}``. Call it before the runtime starts its threads: they inherit the affinity."""
    caps = cpu_capacities(root)
    out: dict[str, Any] = {
        "big_little": (len(set(caps.values())) > 1) if caps else None,
        "capacities": {str(n): c for n, c in caps.items()} or None,
        "pinned_to": None,
    }
    chosen, why = big_cores(caps, threads)
    getaffinity = getattr(os, "sched_getaffinity", None)
    setaffinity = setaffinity or getattr(os, "sched_setaffinity", None)
    if chosen is not None and getaffinity is not None:
        allowed = getaffinity(0)
        chosen = [n for n in chosen if n in allowed]
        if len(chosen) < threads:
            chosen, why = None, f"{threads} threads: only {len(chosen)} big cores are allowed to this process"
    if chosen is not None:
        if setaffinity is None:
            why = "this platform cannot pin threads (no sched_setaffinity)"
        else:
            try:
                setaffinity(0, set(chosen))
                out["pinned_to"] = chosen
            except OSError as e:
                why = f"pinning refused ({e.strerror or e})"
    out["why"] = why
    return out


def snapshot(root: Path = ROOT) -> dict[str, Any]:
    """Temperatures (°C, per thermal zone, with the zone's type) and current clocks (MHz, per CPU);
    each None when nothing could be read."""
    temps: dict[str, Any] = {}
    try:
        zones = sorted((root / "sys/class/thermal").glob("thermal_zone*"))
    except OSError:
        zones = []
    for zone in zones:
        milli = _read_int(zone / "temp")
        if milli is not None:
            temps[zone.name] = {"type": _read_text(zone / "type"), "c": milli / 1000}
    clocks = {}
    for n, path in _cpus(root):
        khz = _read_int(path / "cpufreq/scaling_cur_freq")
        if khz is not None:
            clocks[f"cpu{n}"] = khz / 1000
    return {"temperature_c": temps or None, "cpu_mhz": clocks or None}


def hottest(snap: dict[str, Any]) -> float | None:
    """The highest temperature in a snapshot (°C), None when none was read."""
    temps = snap.get("temperature_c") or {}
    return max((z["c"] for z in temps.values()), default=None)


def fastest_clock(snap: dict[str, Any]) -> float | None:
    """The highest current CPU clock in a snapshot (MHz), None when none was read."""
    return max((snap.get("cpu_mhz") or {}).values(), default=None)
