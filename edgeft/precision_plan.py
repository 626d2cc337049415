"""Which precision each group of weights gets under a byte budget, from measured sensitivities.

Format-neutral: the GGUF path (:mod:`edgeft.formats.gguf.mixed`) and the ONNX path
(:mod:`edgeft.formats.onnx.mixed`) each measure, per group of weights, how much mean KL divergence
each candidate precision adds and how many bytes it takes, in one shape::

    {"mix": [lowest, ..., highest], "fixed_bytes": int,
     "groups": [{"name": str, "options": [{"level": str, "bytes": int, "added_kld": float}, ...]}]}

and share the choice made from it here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError


def check_fits(max_bytes: int, smallest: int, lowest: str) -> None:
    if smallest > max_bytes:
        raise ConfigError(
            f"max_size_mb = {max_bytes / 1e6:g}: the smallest file this mix can make is {smallest / 1e6:.1f} MB "
            f"(every tensor at {lowest}); raise max_size_mb or add a smaller type to mix"
        )


def plan(sensitivity: dict[str, Any], max_bytes: int, units: int = 50_000) -> dict[str, Any]:
    """One mix level per group: least summed added KLD with the file at most ``max_bytes``.

    Exact for the byte resolution used (``max_bytes / units``, a few kB): sizes are rounded up, so the
    plan never exceeds the budget. Measured KLD changes below zero (noise: a lower type that happened
    to agree better) count as zero."""
    groups = sensitivity["groups"]
    room = max_bytes - sensitivity["fixed_bytes"]
    smallest = sensitivity["fixed_bytes"] + sum(min(o["bytes"] for o in g["options"]) for g in groups)
    check_fits(max_bytes, smallest, sensitivity["mix"][0])  # smallest >= fixed_bytes, so room > 0 after it
    unit = max(1, math.ceil(room / units))
    cap = room // unit
    best = np.zeros(cap + 1)  # least cost within c units, groups so far
    choice = np.zeros((len(groups), cap + 1), dtype=np.int16)
    for gi, g in enumerate(groups):
        new = np.full(cap + 1, np.inf)
        for oi, o in enumerate(g["options"]):
            w = math.ceil(o["bytes"] / unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + max(0.0, o["added_kld"])
            better = cand < new
            new[better] = cand[better]
            choice[gi, better] = oi
        best = new
    c = cap
    picked = []
    for gi in reversed(range(len(groups))):
        o = groups[gi]["options"][choice[gi, c]]
        picked.append((groups[gi], o))
        c -= math.ceil(o["bytes"] / unit)
    picked.reverse()
    return {
        "levels": {g["name"]: o["level"] for g, o in picked},
        "predicted_added_kld": float(sum(max(0.0, o["added_kld"]) for _, o in picked)),
        "predicted_bytes": int(sensitivity["fixed_bytes"] + sum(o["bytes"] for _, o in picked)),
        "max_bytes": int(max_bytes),
    }


def write_sensitivity(folder: Path, result: dict[str, Any], filename: str = "sensitivity.json") -> dict[str, Any]:
    """Write a sweep's figures into ``folder`` and return what its stage manifest records.

    The sweep's wall time (and ``timings``, seconds per step, when given) goes to the manifest only,
    so the same inputs give a byte-identical file."""
    seconds = result.pop("seconds")
    timings = result.pop("timings", None)
    (Path(folder) / filename).write_text(json.dumps(result, indent=1))
    ranked = sorted(result["groups"], key=lambda g: -max(o["added_kld"] for o in g["options"]))
    made = {
        "base_kld": result["base_kld"],
        "probes": result["probes"],
        "seconds": seconds,
        "most_sensitive": [g["name"] for g in ranked[:5]],
    }
    return {**made, "timings": timings} if timings else made
