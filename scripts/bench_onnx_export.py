"""Peak RSS, wall time and a memory timeline of the ONNX export's builder process.

    python scripts/bench_onnx_export.py MODEL_DIR OUT_DIR --quant int4 [--timeline] [--keep]

Runs the same child ``write_onnx`` runs (``python -m edgeft.formats.onnx.export``) with the
PYTHONPATH of this process, so ``PYTHONPATH=/path/to/other/checkout`` measures that checkout. The peak
is the child's ``ru_maxrss`` (``os.wait4``; it includes this small parent's ~35 MB at the fork, no
torch here), beside the child's own VmHWM where the checkout reports it; with ``--timeline`` its RSS
(anonymous / file-backed) is sampled every 0.2 s and printed beside the builder's log lines. A
benchmark, not a test: the wall time moves with whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def _rss(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS, RssAnon, RssFile) in bytes, None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    f = {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in text.splitlines()) if v.endswith("kB")}
    return f.get("VmRSS", 0), f.get("RssAnon", 0), f.get("RssFile", 0)


def run(model: Path, out: Path, quant: str, timeline: bool, stock: bool = False, extra: tuple = ()) -> dict:
    from edgeft.formats.onnx.export import builder_options
    from edgeft.formats.onnx.types import PRECISIONS

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cache = out.parent / f".{out.name}.builder-cache"
    cmd = [
        sys.executable, "-m", "edgeft.formats.onnx.export", "--model", str(model), "--out", str(out),
        "--precision", PRECISIONS[quant], "--cache", str(cache), *[f"--option={o}" for o in [*builder_options({}), *extra]],
    ] + (["--stock"] if stock else [])  # fmt: skip
    # GIT_DIR as write_onnx sets it: model.onnx then names the builder's commit, whichever checkout runs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["GIT_DIR"] = os.devnull
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    samples: list[tuple[float, tuple[int, int, int]]] = []
    lines: list[tuple[float, str]] = []

    def sample() -> None:
        while (r := _rss(proc.pid)) is not None and proc.returncode is None:
            samples.append((time.perf_counter() - t0, r))
            time.sleep(0.2)

    def read() -> None:
        buf = b""
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            buf += chunk
            *done, buf = buf.replace(b"\r", b"\n").split(b"\n")
            now = time.perf_counter() - t0
            lines.extend((now, ln.decode(errors="replace")) for ln in done if ln.strip())

    threads = [threading.Thread(target=f, daemon=True) for f in ((sample, read) if timeline else (read,))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join(timeout=5)
    shutil.rmtree(cache, ignore_errors=True)
    result = {"quant": quant, "rc": proc.returncode, "peak_rss": usage.ru_maxrss * 1024, "wall_s": wall}
    hwm = [ln.rsplit(" ", 1)[-1] for _, ln in lines if ln.startswith("edgeft: builder peak RSS bytes: ")]
    result["vmhwm"] = int(hwm[-1]) if hwm and hwm[-1].isdigit() else None  # this checkout's child only
    if proc.returncode:
        result["tail"] = [ln for _, ln in lines[-5:]]
    if timeline:
        result["timeline"] = _timeline(samples, lines)
    return result


def _timeline(samples, lines) -> list[str]:
    """One row per builder phase: a log line that starts a phase and the peak RSS until the next one."""
    marks: list[tuple[float, str]] = []
    for t, ln in lines:
        ln = re.sub(r"^\S+ \S+ onnxruntime\.quantization\.\S+ \[INFO\] - ", "quantizer: ", ln)
        if marks and _phase(marks[-1][1]) == _phase(ln):
            continue  # one row per run of similar lines (layers, tqdm's tensors, the quantizer's nodes)
        marks.append((t, ln[:90]))
    marks.insert(0, (0.0, "(start)"))
    rows = []
    for i, (t, ln) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else float("inf")
        inside = [r for s, r in samples if t <= s < end]
        if inside:
            peak = max(inside, key=lambda r: r[0])
            rows.append(
                f"{t:7.1f}s  peak {peak[0] / 1e9:5.2f} GB (anon {peak[1] / 1e9:5.2f}, file {peak[2] / 1e9:5.2f})  {ln}"
            )
        else:
            rows.append(f"{t:7.1f}s  {'':44}  {ln}")
    return rows


def _phase(line: str) -> str:
    if "%|" in line or line.startswith("0it"):
        return "progress " + line.split(" ")[0]  # tqdm: Loading weights, Saving tensors
    for prefix in ("Reading layer", "quantizer:"):
        if line.startswith(prefix):
            return prefix
    return line


def folder_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(out.iterdir()) if p.is_file()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--quant", default="int4", choices=["fp32", "int8", "int4"])
    ap.add_argument("--timeline", action="store_true")
    ap.add_argument("--hash", action="store_true", help="print the sha256 of every file written")
    ap.add_argument("--option", action="append", default=[], help="a builder option KEY=VALUE, e.g. algo_config=rtn")
    ap.add_argument("--stock", action="store_true", help="the builder's save as shipped (this checkout's --stock)")
    ap.add_argument("--keep", action="store_true", help="keep the exported folder (deleted otherwise)")
    a = ap.parse_args()
    r = run(a.model, a.out, a.quant, a.timeline, a.stock, tuple(a.option))
    hwm = f" (its VmHWM {r['vmhwm'] / 1e9:.2f} GB)" if r["vmhwm"] else ""
    print(f"{a.quant}: exit {r['rc']}, peak RSS {r['peak_rss'] / 1e9:.2f} GB{hwm}, {r['wall_s']:.1f} s")
    for row in r.get("timeline", []) + r.get("tail", []):
        print("  " + row)
    if a.hash and r["rc"] == 0:
        for name, h in folder_hashes(a.out).items():
            print(f"  {h}  {name}")
    if not a.keep:
        shutil.rmtree(a.out, ignore_errors=True)
    return r["rc"]


if __name__ == "__main__":
    sys.exit(main())
