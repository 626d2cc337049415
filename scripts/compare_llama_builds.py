"""Time GGUF files under two or more llama.cpp builds, interleaved in one run, with the fp32 reference.

    .venv/bin/python scripts/compare_llama_builds.py --build generic=/path/to/lib --build native=/path/to/lib \\
        --reference out/demo/merged --gguf out/demo/gguf-q8/model.gguf --gguf out/demo/gguf-q4/model.gguf \\
        --rounds 3 --threads 2

Each ``--build`` is a folder holding a llama-cpp-python build's ``libllama.so`` and its ``libggml*``
(llama-cpp-python loads it from ``LLAMA_CPP_LIB_PATH``). Every timing is edgeft's own probe (one
fresh process per model: the same harness as ``edgeft bench``), and builds alternate within each
round so that load on a shared machine falls on all of them alike. Prints one JSON line per probe
and a markdown table of medians [min-max] over all rounds' runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from edgeft.bench.probe import run_probe
from edgeft.machine import describe, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", action="append", required=True, help="NAME=LIB_DIR (repeatable)")
    ap.add_argument("--gguf", action="append", required=True, type=Path)
    ap.add_argument("--reference", type=Path, help="fp32 HF folder, timed with torch in the same rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    builds = dict(b.split("=", 1) for b in a.build)
    runs: dict[tuple[str, str], list[dict]] = {}
    lengths = (a.threads, a.prompt_tokens, a.decode_tokens, a.repeats)
    for _ in range(a.rounds):
        if a.reference:
            r = run_probe("torch", a.reference, *lengths)
            runs.setdefault(("fp32", "torch"), []).append(r["latency"])
            print(json.dumps({"model": "fp32", "build": "torch", **r["latency"]}), flush=True)
        for gguf in a.gguf:
            for name, lib in builds.items():
                os.environ["LLAMA_CPP_LIB_PATH"] = lib
                r = run_probe("llama.cpp", gguf, *lengths)
                runs.setdefault((gguf.parent.name, name), []).append(r["latency"])
                print(json.dumps({"model": gguf.parent.name, "build": name, **r["latency"]}), flush=True)
    print(f"\n{summary(describe())}; {a.threads} threads; {a.prompt_tokens}-token prompt, {a.decode_tokens} decoded")
    print(f"{a.rounds} rounds x {a.repeats} timed runs, builds interleaved\n")
    print("| model | build | decode tok/s | prefill tok/s | TTFT ms |\n|---|---|---:|---:|---:|")

    def cell(lats: list[dict], key: str) -> str:
        # medians of each round's runs, then the median and range across rounds
        meds = [lat[key]["median"] for lat in lats]
        return f"{statistics.median(meds):.1f} [{min(meds):.1f}–{max(meds):.1f}]"

    for (model, build), lats in runs.items():
        print(
            f"| {model} | {build} | {cell(lats, 'decode_tok_s')} | {cell(lats, 'prefill_tok_s')} | {cell(lats, 'ttft_ms')} |"
        )


if __name__ == "__main__":
    main()
