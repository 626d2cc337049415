"""The sensitivity sweep's measurement: end-to-end probes in llama.cpp and, past a few layers, a
layer-local error estimate calibrated by them (see :mod:`.mixed` for the stage and the plan).

Every probe file is assembled from the level files (:mod:`.levels`) and scored against the F32
export's top-k reference (:mod:`.scoring`). Two methods give each group's added KLD per level:

* ``exact``: one probe per (group, level): only that group lowered, everything else at the top level.
  Probes = 1 + groups × (levels − 1), growing with layers × model size.
* ``proxy``: groups outside the layers (the embedding, an untied head) are probed as in ``exact``.
  A layer tensor's added KLD is predicted as ``rate(role, level) × depth(layer) × local error``:
  the local error is the squared change its rounding makes in the layer's own output, per token
  (Σ_j E[x_j²] Σ_i ΔW_ij², the inputs' mean squares measured by llama.cpp on the F32 export during
  the reference pass, the rounding read back from the level files); the rates and the depth factors
  are fitted to two kinds of end-to-end probes: each *role* (``attn_q``, ``ffn_down``, …) lowered in
  every layer at once, at every level, and each *run of layers* with all its tensors lowered to the
  lowest level. Probes = 1 + outside groups × (levels − 1) + roles × (levels − 1) + runs: 24 for a
  30-layer llama and a three-level mix, against 123 for ``exact``; they do not grow with the layers
  beyond a run every five.

``auto`` takes ``exact`` when it needs no more probes (models of a few layers).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...proxy_fit import Term, fit_rates_and_depths, predicted
from ...proxy_fit import depth_blocks as proxy_depth_blocks
from .layout import Layout, layer_of, resolve, role_of
from .levels import GGUFFile, assemble, weighted_errors
from .llama_quantize import quantize_file
from .scoring import ActivationStats, Scorer, TopKReference, mean_kld

DEPTH_BLOCK = 5  # layers per depth probe after layer 0


def depth_blocks(n_layers: int) -> list[list[int]]:
    """Layer 0 alone, then runs of about :data:`DEPTH_BLOCK` layers (:func:`edgeft.proxy_fit.depth_blocks`)."""
    return proxy_depth_blocks(n_layers, DEPTH_BLOCK)


@dataclass
class Probe:
    """One end-to-end measurement: the file with these tensors at these levels, the rest at the top."""

    key: str  # "<unit>@<level>": a group ("blk.3.attn", "token_embd") or a role ("role:attn_q")
    levels: dict[str, str]  # tensor name → mix level


def _units(layout: Layout, method: str) -> dict[str, list[str]]:
    """What is probed as one: each group outside the layers and, with ``method`` "exact", every group;
    with "proxy", each role (``role:attn_q``: that tensor in every layer) instead of the layers' groups."""
    units: dict[str, list[str]] = {}
    for group, names in layout.groups.items():
        if method == "exact" or any(role_of(n) is None for n in names):
            units[group] = names
        else:
            for n in names:
                units.setdefault(f"role:{role_of(n)}", []).append(n)
    return units


def _probes(layout: Layout, mix: tuple[str, ...], method: str) -> tuple[list[Probe], dict[tuple[str, str], str]]:
    """The end-to-end probes a sweep runs, and (unit, level) → the key of the probe that measures it
    ("" where the level resolves to the top level's types). Levels resolving to the types of a level
    already probed share its probe."""
    top = mix[-1]
    probes, measured_by = [], {}
    units = _units(layout, method)
    for unit, names in units.items():
        seen = {tuple(resolve(top, layout.shapes[n][0]) for n in names): ""}
        for level in reversed(mix):
            key = tuple(resolve(level, layout.shapes[n][0]) for n in names)
            if key not in seen:
                seen[key] = f"{unit}@{level}"
                probes.append(Probe(seen[key], {n: level for n in names}))
            measured_by[unit, level] = seen[key]
    if method == "proxy":  # one probe per run of layers, every layer tensor at the lowest level
        layered = [n for unit, names in units.items() if unit.startswith("role:") for n in names]
        for block in depth_blocks(1 + max((layer_of(n) for n in layered), default=-1)):
            names = [n for n in layered if layer_of(n) in block]
            if any(resolve(mix[0], layout.shapes[n][0]) != resolve(top, layout.shapes[n][0]) for n in names):
                probes.append(Probe(f"depth:{block[0]}-{block[-1]}@{mix[0]}", {n: mix[0] for n in names}))
    return probes, measured_by


def choose_method(layout: Layout, mix: tuple[str, ...]) -> str:
    """ "exact" when probing every group costs no more probes than calibrating every role (few layers)."""
    exact, proxy = (len(_probes(layout, mix, m)[0]) for m in ("exact", "proxy"))
    return "exact" if exact <= proxy else "proxy"


class _Files:
    """The level files in ``folder`` (every tensor at one mix level) and probe files assembled from them."""

    def __init__(self, f32_path: Path, folder: Path, layout: Layout, mix: tuple[str, ...], threads: int, imatrix):
        self.folder, self.top = folder, mix[-1]
        self.levels: dict[str, GGUFFile] = {}
        for level in mix:
            path = folder / f"level-{level}.gguf"
            types = {n: t for g in layout.groups for n, t in layout.types(g, level).items()}
            quantize_file(f32_path, path, "Q8_0", threads, imatrix=imatrix, tensor_types=types)
            self.levels[level] = GGUFFile(path)

    def probe(self, levels: dict[str, str]) -> Path:
        path = self.folder / "probe.gguf"
        assemble(self.levels[self.top], {n: self.levels[lv] for n, lv in levels.items()}, path)
        return path


def _reference(f32_path: Path, chunks: np.ndarray, layout: Layout, threads: int):
    """The F32 export's top-k log-probs on ``chunks`` and its weights' input statistics (one pass)."""
    stats = ActivationStats({n: s[0] for n, s in layout.shapes.items()})
    reference = TopKReference()
    with Scorer(f32_path, int(chunks.shape[1]), threads, observe=stats) as scorer:
        for chunk in chunks:
            reference.add(scorer.logits(chunk))
    return reference, stats


def score(path: Path, chunks: np.ndarray, reference: TopKReference, threads: int) -> float:
    with Scorer(path, int(chunks.shape[1]), threads) as scorer:
        return mean_kld(scorer, chunks, reference)


def _local_errors(
    f32: GGUFFile, files: _Files, names: list[str], mix: tuple[str, ...], stats: ActivationStats
) -> dict[str, dict[str, float]]:
    """tensor → level → the squared output error per token its rounding adds over the top level's:
    Σ_j E[x_j²] Σ_i ΔW_ij², E[x_j²] the input's mean square measured by llama.cpp (1 per column for a
    tensor llama.cpp never multiplies by). Inputs are taken as uncorrelated, as an importance matrix does."""
    means = stats.mean_squares()
    out: dict[str, dict[str, float]] = {}
    for name in names:
        weight = means.get(name)
        per_level = {}
        for level in mix:
            err = weighted_errors(f32.tensors[name], files.levels[level].tensors[name]).columns
            per_level[level] = float(err @ weight) if weight is not None else float(err.sum())
        out[name] = {lv: max(0.0, e - per_level[mix[-1]]) for lv, e in per_level.items()}
    return out


@dataclass
class _Fit:
    """The proxy's conversion to added KLD: per role probe, KLD per unit of depth-weighted local error;
    per layer, the depth factor of its run (see :func:`_fit`)."""

    rate: dict[str, float]  # role probe key → added KLD per unit of depth-weighted local error
    depth: np.ndarray  # per layer
    rows: list[dict[str, Any]]

    def predict(self, name: str, level: str, role_probe: str, local: dict[str, dict[str, float]]) -> float:
        return self.rate[role_probe] * self.depth[layer_of(name)] * local[name][level] if role_probe else 0.0


def _fit(probes: list[Probe], added: dict[str, float], local, measured_by) -> _Fit:
    """Per tensor, added KLD ≈ rate(role probe, level) × depth(layer) × local error, fitted to the
    role and depth probes (:func:`edgeft.proxy_fit.fit_rates_and_depths`); a row per probe with its
    fitted figure beside the measured one."""
    roles = [p for p in probes if p.key.startswith("role:")]
    blocks = [p for p in probes if p.key.startswith("depth:")]

    def terms(p: Probe, rate_key: str | None = None) -> list[Term]:
        """A role probe's tensors all take its rate; a depth probe's each the rate of its role's probe."""
        return [
            Term(rate_key or measured_by[f"role:{role_of(n)}", lv], layer_of(n), local[n][lv])
            for n, lv in p.levels.items()
        ]

    role_terms = {p.key: terms(p, p.key) for p in roles}
    block_terms = {p.key: terms(p) for p in blocks}
    n_layers = 1 + max((t.layer for ts in role_terms.values() for t in ts), default=0)
    rate, depth = fit_rates_and_depths(
        {key: (added[key], ts) for key, ts in role_terms.items()},
        [(added[key], ts) for key, ts in block_terms.items()],
        n_layers,
    )
    every = {**role_terms, **block_terms}
    rows: list[dict[str, Any]] = []
    for p in roles + blocks:
        ts = every[p.key]
        row = {
            "probe": p.key,
            "tensors": len(p.levels),
            "added_kld": added[p.key],
            "fitted_kld": predicted(ts, rate, depth),
        }
        if p.key.startswith("role:"):
            row.update(local_error=sum(t.local for t in ts), kld_per_local_error=rate[p.key])
        else:
            row.update(depth_factor=float(depth[ts[0].layer]))
        rows.append(row)
    return _Fit(rate, depth, rows)


METHOD_NOTES = {
    "exact": "every option's added_kld is measured end to end: llama.cpp on a file with only that group at "
    "that level and every other tensor at the top level, against the F32 export",
    "proxy": "options of groups outside the layers (embedding, head) are measured end to end as in 'exact'; "
    "a layer group's added_kld is predicted: the sum over its tensors of the tensor's local_error (its "
    "rounding error weighted by its input's mean squares, measured by llama.cpp on the F32 export) times "
    "the kld_per_local_error of its role and level and the depth_factor of its layer, fitted so that the "
    "end-to-end probes in calibration come out exactly: each role lowered in every layer at once, and "
    "every layer tensor of a run of layers lowered to the lowest level",
}


class _Laps:
    """Seconds spent per phase of the sweep (summed over its laps); each lap advances the progress bar."""

    def __init__(self, advance: Callable[[], None]):
        self.timings: dict[str, float] = {}
        self.advance = advance
        self.clock = time.perf_counter()

    def __call__(self, what: str) -> None:
        now = time.perf_counter()
        self.timings[what] = round(self.timings.get(what, 0.0) + now - self.clock, 2)
        self.clock = now
        self.advance()


def measure(
    f32_path: Path,
    chunks: np.ndarray,
    mix: tuple[str, ...],
    scratch: Path,
    *,
    threads: int = 0,
    imatrix: dict[str, np.ndarray] | None = None,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    method: str = "auto",
) -> dict[str, Any]:
    """Every group's added KLD at every ``mix`` level below the highest (see the module docstring)."""
    layout = Layout.of(f32_path)
    top = mix[-1]
    method = choose_method(layout, mix) if method == "auto" else method
    probes, measured_by = _probes(layout, mix, method)
    lap = _Laps(progress("sensitivity", len(probes) + 4) if progress else (lambda: None))
    folder = Path(scratch) / "levels"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        files = _Files(f32_path, folder, layout, mix, threads, imatrix)
        lap("quantize_levels")
        reference, stats = _reference(f32_path, chunks, layout, threads)
        lap("reference")
        base = score(files.levels[top].path, chunks, reference, threads)
        lap("probes")
        added = {}
        for probe in probes:
            added[probe.key] = score(files.probe(probe.levels), chunks, reference, threads) - base
            lap("probes")
        local: dict[str, dict[str, float]] = {}
        if method == "proxy":
            names = [n for p in probes if p.key.startswith("role:") for n in p.levels]
            local = _local_errors(GGUFFile(f32_path), files, list(dict.fromkeys(names)), mix, stats)
        lap("local_errors")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    fit = _fit(probes, added, local, measured_by)
    groups = [_options(layout, g, mix, measured_by, added, local, fit) for g in layout.groups]
    return {
        "mix": list(mix),
        "method": method,
        "method_note": METHOD_NOTES[method],
        "base_kld": base,
        "positions": int(chunks.size),
        "reference_top_k": reference.k,
        "fixed_bytes": layout.fixed_bytes,
        "groups": groups,
        "calibration": fit.rows,
        "probes": 1 + len(probes),
        "seconds": round(sum(lap.timings.values()), 1),
        "timings": lap.timings,
        "reference": {"tokens": np.asarray(chunks, dtype=np.int32), **reference.to_arrays()},
    }


def _options(layout, group, mix, measured_by, added, local, fit: _Fit) -> dict[str, Any]:
    """A group's options, low to high: measured where a probe lowered the group alone, else predicted."""
    names = layout.groups[group]
    options = []
    for level in mix:
        types = layout.types(group, level)
        option: dict[str, Any] = {"level": level, "types": sorted(set(types.values())), "bytes": layout.nbytes(types)}
        if (group, level) in measured_by:
            key = measured_by[group, level]
            option.update(added_kld=added[key] if key else 0.0, source="probe" if key else "top")
        else:
            keys = {n: measured_by[f"role:{role_of(n)}", level] for n in names}
            predicted = sum(fit.predict(n, level, k, local) for n, k in keys.items())
            local_error = sum(local[n][level] for n, k in keys.items() if k)
            option.update(added_kld=float(predicted), source="proxy", local_error=local_error)
        options.append(option)
    return {"name": group, "tensors": names, "options": options}
