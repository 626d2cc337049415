"""Where a build folder (``edgeft build --out``) keeps each stage's output. pipeline.py writes these
folders; `edgeft bench --build`, `edgeft package`, the device projections and imported device runs
read them, by these names.

    BUILD/adapter  merged  reference  bench-base  [bench-adapter-nf4]
          <target>/ (its format's artifact)   bench-<target>/  bench-<conversion>/
          devices/ (runs measured elsewhere)  report.json  report.md  junit.xml
"""

from __future__ import annotations

from pathlib import Path

from .formats import FORMATS, get_format
from .stage import read_manifest

ADAPTER = "adapter"
MERGED = "merged"
REFERENCE = "reference"
BENCH_NF4 = "bench-adapter-nf4"  # QLoRA builds: the adapter on its NF4 base, as trained
BENCH_PREFIX = "bench-"
# the stages a target's artifact is written by: a build's targets are the folders they made
ARTIFACT_STAGES = ("export", "quantize")


def bench_dir(build_dir: Path, row: str) -> Path:
    """The bench stage's folder of a target or a conversion (``bench-<row>``)."""
    return Path(build_dir) / f"{BENCH_PREFIX}{row}"


def built_targets(build_dir: Path) -> list[str]:
    """The targets a build holds: folders an artifact stage wrote, less each format's unquantized
    export (a ladder row, not a target)."""
    conversions = {get_format(f).CONVERSION for f in FORMATS}
    return sorted(
        p.name
        for p in Path(build_dir).iterdir()
        if p.is_dir() and p.name not in conversions and (read_manifest(p) or {}).get("stage") in ARTIFACT_STAGES
    )
