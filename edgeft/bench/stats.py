"""Small statistics helpers shared by the benchmark modules."""

from __future__ import annotations

import statistics


def spread(values: list[float]) -> dict[str, float]:
    """Median with min and max, the form every benchmark number is reported in."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
