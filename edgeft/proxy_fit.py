"""The sensitivity sweeps' proxy model, shared by the GGUF and the ONNX sweep.

A rounding's added KLD at the logits is predicted as rate × depth × local error: the local error
is how much the rounding moves its own layer's output (each format measures it its own way), the
rate converts that into KLD for one kind of weight (a role: q, k, v, o, gate, up, down, at one
level), and the depth factor says how far a layer's error travels to the logits (SmolLM2-135M: 4×
the average per unit of local error in layer 0, a sixth of it in the last layers, where the
residual stream is largest).

Rates and depth factors are fitted to two kinds of end-to-end probes by alternating rescaling
(iterative proportional fitting): a role probe lowers one role in every layer at once and fixes
that role's rate; a depth probe lowers every weight of a run of layers and fixes those layers'
depth factor. The role probes come out exact, the depth probes too when the probes add up (they
do closely on real models; callers report each probe's fitted figure beside the measured one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np


def depth_blocks(n_layers: int, run: int) -> list[list[int]]:
    """The depth probes' layers: layer 0 alone (its residual stream is the smallest, so its rounding
    weighs most, and travels through every layer), then the others in runs of about ``run``."""
    rest = list(range(1, n_layers))
    runs = np.array_split(rest, math.ceil(len(rest) / run)) if rest else []
    return [[0]] + [[int(i) for i in r] for r in runs]


class Term(NamedTuple):
    """One lowered weight inside a probe."""

    rate: str  # the key of the rate that applies to it
    layer: int
    local: float  # its local error


def predicted(terms: Iterable[Term], rate: Mapping[str, float], depth: np.ndarray) -> float:
    """The added KLD the proxy predicts for lowering these weights together (a rate not fitted: 0)."""
    return sum(rate.get(t.rate, 0.0) * depth[t.layer] * t.local for t in terms)


def fit_rates_and_depths(
    roles: Mapping[str, tuple[float, Sequence[Term]]],
    blocks: Sequence[tuple[float, Sequence[Term]]],
    n_layers: int,
    iterations: int = 200,
) -> tuple[dict[str, float], np.ndarray]:
    """``roles``: rate key → (measured added KLD, the probe's terms, all with that key); ``blocks``:
    (measured added KLD, terms) per depth probe. The rates, and a depth factor per layer averaging 1
    (only rate × depth matters). A negative measurement (noise) counts as 0."""
    depth = np.ones(n_layers)

    def rates() -> dict[str, float]:
        out = {}
        for key, (added, terms) in roles.items():
            denom = sum(depth[t.layer] * t.local for t in terms)
            out[key] = max(0.0, added) / denom if denom > 0 else 0.0
        return out

    for _ in range(iterations):
        rate, before = rates(), depth.copy()
        for added, terms in blocks:
            guess = predicted(terms, rate, depth)
            if guess > 0:
                depth[sorted({t.layer for t in terms})] *= max(0.0, added) / guess
        if np.allclose(depth, before, rtol=1e-9, atol=0):
            break
    if depth.mean() > 0:
        depth /= depth.mean()
    return rates(), depth
