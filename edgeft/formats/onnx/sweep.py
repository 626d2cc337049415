"""The ONNX sensitivity sweep's measurement: one onnxruntime session of the fp32 export with its
MatMul weights as graph inputs, scored against the fp32 model's top-k reference (see :mod:`.mixed`
for the stage and the plan). Every probe feeds every weight int8-rounded except the ones it lowers
to int4; its added KLD is its mean top-k KL divergence from the fp32 model less the all-int8 one's.
Two methods give each node's added KLD at int4:

* ``exact``: one probe per node (each layer's 5 MatMuls and the head): probes = 1 + nodes, each a
  forward pass over every calibration chunk, so the time grows with layers × model size.
* ``proxy``: the head (the one node outside the layers) is probed as in ``exact``; a layer node's
  added KLD is predicted as ``rate(role) × depth(layer) × local error``. The local error is the
  squared change int4 makes in the node's own output over int8's, per token (Σ_j E[x_j²] Σ_i ΔW_ji²,
  the input mean squares measured during the reference pass, or the importance matrix's when int4
  is rounded by one: the same statistic). The rates and depth factors are fitted (:func:`fit`) to
  two kinds of probes: each *role* (``qkv_proj``, ``down_proj``, …) at int4 in every layer at once,
  and each *run of layers* (layer 0, then runs of three) with all its nodes at int4. Then the
  :data:`REFINE` nodes the fit finds most sensitive are probed alone and the fit is redone without
  them: one outlier otherwise sets its run's depth factor for every node beside it. Probes =
  1 + 1 + roles + runs + 8: 26 for SmolLM2-135M's 30 layers against 152, growing with a run every
  three layers, not with layers × nodes. On SmolLM2-135M (512 cooking tokens) its plans lost 3–5%
  more held-out KLD than the exact sweep's at 1.10–1.25× the int4 size (docs/quantization.md).

``auto`` takes ``exact`` when it needs no more probes (models of up to three layers).

Memory: the probe holds one model's worth of weights, the int8-rounded copy every probe starts from
(each weight rounded once as it is read), plus the int4 copies of the nodes one probe lowers (a role
probe: one node per layer). The fp32 weights stay in the export's external-data file, memory-mapped:
the reference pass and each node's int4 rounding read them from there (page cache, not the
process's own memory). The reference is each position's top-k log-probs
(:class:`~edgeft.divergence.TopKReference`), not full-vocabulary rows.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...divergence import TopKReference
from ...proxy_fit import Term, fit_rates_and_depths, predicted
from ...proxy_fit import depth_blocks as proxy_depth_blocks
from .graph import BLOCK, LEVELS, ChunkSession, Layout, decoder, inline_external
from .rounding import InputSquares
from .rounding import fake_quant as weighted_int4


def fake_quant(w: np.ndarray, bits: int, block: int = BLOCK) -> np.ndarray:
    """``w`` [K, N] rounded as MatMulNBits stores it (symmetric, block-wise along K), back in fp32.

    The rounding is onnxruntime's own C++ kernel, the one its MatMulNBitsQuantizer calls; only the
    unpacking is ours: blocks are [N, k_blocks, block·bits/8] bytes, low nibble first for 4 bits,
    stored unsigned with the zero point at the middle of the range (8, or 128) and one scale a block.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w.shape
    k_blocks = -(-k // block)
    padded = np.zeros((k_blocks * block, n), dtype=np.float32)
    padded[:k] = w
    packed = np.zeros((n, k_blocks, block * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-k_blocks * bits // 8)), dtype=np.uint8)
    quant = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quant(packed, padded, scales, zero_points, block, n, k_blocks * block, True)
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k_blocks, block)
    else:
        q = packed
    values = (q.astype(np.float32) - (1 << (bits - 1))) * scales[:, :, None]
    return np.ascontiguousarray(values.reshape(n, -1)[:, :k].T)


class Fp32Weights:
    """An export's weight initializers, read on demand: views of its external-data files, mapped
    read-only (nothing is copied into the process), or, for a weight kept inside the graph file,
    the array decoded from it."""

    def __init__(self, folder: Path, model, names: set[str]):
        import onnx
        from onnx import TensorProto, numpy_helper

        self._files: dict[str, np.memmap] = {}
        self._external: dict[str, tuple[str, int, tuple[int, ...], np.dtype]] = {}
        self._inline: dict[str, np.ndarray] = {}
        for init in model.graph.initializer:
            if init.name not in names:
                continue
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
            if init.data_location == TensorProto.EXTERNAL:
                info = {e.key: e.value for e in init.external_data}
                location = info["location"]
                if location not in self._files:
                    self._files[location] = np.memmap(Path(folder) / location, dtype=np.uint8, mode="r")
                self._external[init.name] = (location, int(info.get("offset", 0)), tuple(init.dims), dtype)
            else:  # small models keep some initializers in the graph file itself
                self._inline[init.name] = numpy_helper.to_array(init)

    def names(self) -> list[str]:
        return [*self._external, *self._inline]

    def __getitem__(self, name: str) -> np.ndarray:
        """fp32 ``[K, N]``: a read-only view of the mapped file when stored as fp32 there."""
        if name in self._inline:
            w = self._inline[name]
        else:
            location, offset, dims, dtype = self._external[name]
            w = np.ndarray(dims, dtype=dtype, buffer=self._files[location], offset=offset)
        return w.astype(np.float32, copy=False)


class ProbeModel:
    """The fp32 export with its MatMul weights as graph inputs: one session, any rounding of them.

    ``base`` holds every weight rounded through the int8 quantizer (the one copy of the model the
    probe keeps); ``fp32`` reads the export's own weights from its mapped file. With ``observe``, the
    reference pass also measures every MatMul input's mean squares (``squares``)."""

    def __init__(self, folder: Path, scratch: Path, threads: int = 0, observe: bool = False):
        import onnx

        model = onnx.load(str(decoder(folder)), load_external_data=False)
        self.layout = Layout.of(model)
        self.squares = InputSquares(model, self.layout) if observe else None
        if self.squares is not None:
            self.squares.expose(model)
        names = set(self.layout.weights.values())
        self.fp32 = Fp32Weights(folder, model, names)
        self.base: dict[str, np.ndarray] = {}
        kept = []
        for init in model.graph.initializer:
            if init.name in names:
                self.base[init.name] = fake_quant(self.fp32[init.name], 8)
                model.graph.input.append(
                    onnx.helper.make_tensor_value_info(init.name, onnx.TensorProto.FLOAT, init.dims)
                )
            else:
                kept.append(init)
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        inline_external(model, Path(folder))  # the rest: norms, rotary caches, an untied embedding
        self.session = ChunkSession(model, folder, scratch, "probe", threads)
        del model, kept  # the session has its own copy of the graph

    def logits(self, chunk: np.ndarray, changed: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """[positions, vocab] with ``changed`` weights (name → fp32 values) fed over the int8 base."""
        return self.session.run(["logits"], chunk, {**self.base, **(changed or {})})[0][0]

    def reference(self, chunks: np.ndarray) -> TopKReference:
        """The fp32 model's top-k log-probs on ``chunks`` (and, observing, its MatMul inputs' squares)."""
        reference = TopKReference()
        fp32 = {name: self.fp32[name] for name in self.base}
        outputs = ["logits", *(self.squares.outputs if self.squares is not None else [])]
        for chunk in chunks:
            logits, *inputs = self.session.run(outputs, chunk, fp32)
            reference.add(logits[0])
            if self.squares is not None:
                self.squares.add(inputs)
        return reference

    def kld(self, chunks: np.ndarray, reference: TopKReference, changed: dict[str, np.ndarray] | None = None) -> float:
        """Mean top-k KL divergence from the reference over every position of ``chunks``."""
        total = 0.0
        for i, chunk in enumerate(chunks):
            total += float(reference.kld(i, self.logits(chunk, changed)).sum())
        return total / chunks.size


# ------------------------------------------------------------------------------------------ probes

DEPTH_BLOCK = 3  # layers per depth probe after layer 0
REFINE = 8  # layer nodes the fit predicts most sensitive, then probed alone and the fit redone without them
_LAYER = re.compile(r"^(.*/layers\.)(\d+)(/.*)$")


def layer_of(node: str) -> int | None:
    """The decoder layer a MatMul node is in (``/model/layers.3/mlp/up_proj/MatMul`` → 3), else None."""
    m = _LAYER.match(node)
    return int(m.group(2)) if m else None


def role_of(node: str) -> str | None:
    """What a layer's MatMul is, the same in every layer (``/model/layers.*/mlp/up_proj/MatMul``)."""
    m = _LAYER.match(node)
    return f"{m.group(1)}*{m.group(3)}" if m else None


def depth_blocks(n_layers: int) -> list[list[int]]:
    """Layer 0 alone, then runs of about :data:`DEPTH_BLOCK` layers (:func:`edgeft.proxy_fit.depth_blocks`)."""
    return proxy_depth_blocks(n_layers, DEPTH_BLOCK)


@dataclass
class Probe:
    """One end-to-end measurement: these MatMul nodes at int4, every other at int8."""

    key: str  # a node ("/lm_head/MatMul"), "role:<role>" or "depth:<first>-<last>"
    nodes: list[str]


def probes(layout: Layout, method: str) -> list[Probe]:
    """``exact``: one probe per node. ``proxy``: one per node outside the layers (the head), one per
    role (that node in every layer) and one per run of layers (every node of those layers)."""
    if method == "exact":
        return [Probe(node, [node]) for node in layout.weights]
    out, roles, layered = [], {}, []
    for node in layout.weights:
        role = role_of(node)
        if role is None:
            out.append(Probe(node, [node]))
        else:
            roles.setdefault(role, []).append(node)
            layered.append(node)
    out += [Probe(f"role:{role}", nodes) for role, nodes in roles.items()]
    if layered:
        for block in depth_blocks(1 + max(layer_of(n) for n in layered)):
            out.append(Probe(f"depth:{block[0]}-{block[-1]}", [n for n in layered if layer_of(n) in block]))
    return out


def choose_method(layout: Layout) -> str:
    """ "exact" when probing every node costs no more probes than the proxy's (few layers)."""
    refined = min(REFINE, sum(role_of(n) is not None for n in layout.weights))
    return "exact" if len(probes(layout, "exact")) <= len(probes(layout, "proxy")) + refined else "proxy"


# ------------------------------------------------------------------------------------------- proxy


def local_error(w: np.ndarray, int8: np.ndarray, int4: np.ndarray, squares: np.ndarray) -> float:
    """The squared output error per token that int4 adds over int8 in this MatMul alone:
    Σ_j E[x_j²] Σ_i ΔW_ji² (ΔW the rounding, [K, N]; inputs taken as uncorrelated, as an importance
    matrix takes them), int4's less int8's, at least 0."""
    e4 = ((int4 - w) ** 2).sum(axis=1, dtype=np.float64)
    e8 = ((int8 - w) ** 2).sum(axis=1, dtype=np.float64)
    return max(0.0, float(np.asarray(squares, dtype=np.float64) @ (e4 - e8)))


@dataclass
class Fit:
    """A layer node's added KLD ≈ rate(role) × depth(layer) × local error (see :func:`fit`)."""

    rate: dict[str, float]  # role → added KLD per unit of depth-weighted local error
    depth: np.ndarray  # per layer, averaging 1
    rows: list[dict[str, Any]]  # per calibrating probe: measured and fitted added KLD
    local: dict[str, float]  # node → local error (0 for nodes measured alone)

    def predict(self, node: str) -> float:
        return self.rate[role_of(node)] * self.depth[layer_of(node)] * self.local[node]


def fit(
    calibrating: list[Probe],
    added: dict[str, float],
    local: dict[str, float],
    known: dict[str, float] | None = None,
    iterations: int = 200,
) -> Fit:
    """The rates (one per role) and depth factors (one per run of layers) fitted to the role and
    depth probes by alternating rescaling (iterative proportional fitting, as the GGUF proxy): the
    role probes come out exact, the depth probes too when the probes add up; each row shows the
    fitted figure beside the measured one. ``known``: nodes measured alone; their figures are taken
    out of every probe that holds them and they take no part in the fit (an outlier such as
    SmolLM2's layer-11 down projection otherwise sets its whole run's depth factor).

    The local error sees how much a rounding moves its MatMul's own output; how far that travels to
    the logits depends on the layer (the residual stream grows with depth), which the depth factors take."""
    known = known or {}
    measured = added
    added = {p.key: added[p.key] - sum(known.get(n, 0.0) for n in p.nodes) for p in calibrating}
    local = {n: 0.0 if n in known else e for n, e in local.items()}
    roles = [p for p in calibrating if p.key.startswith("role:")]
    blocks = [p for p in calibrating if p.key.startswith("depth:")]
    terms = {p.key: [Term(role_of(n), layer_of(n), local[n]) for n in p.nodes] for p in calibrating}
    rate, depth = fit_rates_and_depths(
        {p.key[len("role:") :]: (added[p.key], terms[p.key]) for p in roles},
        [(added[p.key], terms[p.key]) for p in blocks],
        1 + max((layer_of(n) for p in roles for n in p.nodes), default=0),
        iterations,
    )

    def total(p: Probe) -> float:  # with the known nodes' own figures
        return predicted(terms[p.key], rate, depth) + sum(known.get(n, 0.0) for n in p.nodes)

    rows: list[dict[str, Any]] = []
    for p in roles + blocks:
        row = {"probe": p.key, "nodes": len(p.nodes), "added_kld": measured[p.key], "fitted_kld": total(p)}
        row["alone_kld"] = sum(known.get(n, 0.0) for n in p.nodes)  # its nodes measured alone, summed
        if p in roles:
            row.update(local_error=sum(local[n] for n in p.nodes), kld_per_local_error=rate[p.key[len("role:") :]])
        else:
            row.update(depth_factor=float(depth[layer_of(p.nodes[0])]))
        rows.append(row)
    return Fit(rate, depth, rows, local)


METHOD_NOTES = {
    "exact": "every node's added_kld is measured end to end: only that MatMul at int4, every other at int8",
    "proxy": "nodes outside the layers (the head) are measured end to end as in 'exact'; a layer node's "
    "added_kld is predicted: its local_error (the squared output error its int4 rounding adds over int8, "
    "weighted by its input's mean squares on the calibration chunks) times the kld_per_local_error of its "
    "role and the depth_factor of its layer, fitted so that the calibration probes come out: each role at "
    "int4 in every layer at once, and every node of a run of layers at int4. The layer nodes a first fit "
    "predicts most sensitive are then measured alone as in 'exact' (source 'probe') and the fit redone with "
    "their figures taken out of the calibration probes (alone_kld)",
}


# ----------------------------------------------------------------------------------------- measure


def _int4(w: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """``w`` at int4 as the target writes it: rounded by the importance when it has one."""
    return weighted_int4(w, importance) if importance is not None else fake_quant(w, 4)


def _resolve_method(method: str, fp32_folder: Path) -> str:
    import onnx

    if method not in ("auto", "exact", "proxy"):
        raise ValueError(f"method: expected 'auto', 'exact' or 'proxy', got {method!r}")
    if method == "auto":
        return choose_method(Layout.of(onnx.load(str(decoder(fp32_folder)), load_external_data=False)))
    return method


def _calibrate(planned: list[Probe], added: dict[str, float], local: dict[str, float], refine: int, run) -> Fit:
    """The proxy's fit: fit the role and run probes, probe alone the ``refine`` nodes the first fit
    predicts most sensitive, and fit again with those known."""
    calibrating = [p for p in planned if ":" in p.key]
    first = fit(calibrating, added, local)
    for node in sorted(local, key=first.predict, reverse=True)[:refine]:
        run(Probe(node, [node]))
    return fit(calibrating, added, local, known={n: added[n] for n in local if n in added})


def _groups(layout: Layout, added: dict[str, float], local: dict[str, float], calibration: Fit | None) -> list:
    """Each MatMul's int4 and int8 options: the probe's figure where one measured it, else the fit's."""
    groups = []
    for node in layout.weights:
        if node in added:
            measured: dict[str, Any] = {"added_kld": added[node], "source": "probe"}
        else:
            measured = {"added_kld": calibration.predict(node), "source": "proxy", "local_error": local[node]}
        groups.append(
            {
                "name": node,
                "shape": list(layout.shapes[node]),
                "options": [
                    {"level": "int4", "bytes": layout.option_bytes(node, "int4"), **measured},
                    {"level": "int8", "bytes": layout.option_bytes(node, "int8"), "added_kld": 0.0},
                ],
            }
        )
    return groups


def measure(
    fp32_folder: Path,
    chunks: np.ndarray,
    scratch: Path,
    fixed_bytes: int,
    *,
    threads: int = 0,
    shared_embedding: bool = True,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    importance: dict[str, np.ndarray] | None = None,
    method: str = "auto",
) -> dict[str, Any]:
    """Every MatMul's added KLD at int4 with the rest at int8 (see :mod:`.mixed`), by ``method``
    ("exact", "proxy" or "auto": the one with fewer probes). ``shared_embedding``: whether the int4
    file's embedding reads the head's int4 weights; ``importance``: node → column importance when int4
    is rounded by it (see :mod:`.rounding`; the proxy then weighs errors by it too, the same statistic)."""
    method = _resolve_method(method, fp32_folder)
    probe = ProbeModel(fp32_folder, scratch, threads, observe=method == "proxy" and importance is None)
    layout = probe.layout
    if not shared_embedding:
        layout.tied_embedding = None  # the embedding is its own table at every head width
    planned = probes(layout, method)
    refine = min(REFINE, sum(role_of(n) is not None for n in layout.weights)) if method == "proxy" else 0
    advance = progress("sensitivity", 1 + len(planned) + refine) if progress else (lambda: None)
    start = time.perf_counter()
    reference = probe.reference(chunks)
    squares = importance if importance is not None else (probe.squares.means() if probe.squares else {})
    base = probe.kld(chunks, reference)
    advance()

    added: dict[str, float] = {}
    local: dict[str, float] = {}

    def run(p: Probe) -> None:
        changed = {}
        for node in p.nodes:
            weight = layout.weights[node]
            changed[weight] = _int4(probe.fp32[weight], importance[node] if importance is not None else None)
            if method == "proxy" and p.key.startswith("role:"):  # each layer node is in one role probe
                local[node] = local_error(probe.fp32[weight], probe.base[weight], changed[weight], squares[node])
        added[p.key] = probe.kld(chunks, reference, changed) - base
        advance()

    for p in planned:
        run(p)
    calibration = _calibrate(planned, added, local, refine, run) if method == "proxy" else None
    return {
        "mix": list(LEVELS),
        "method": method,
        "method_note": METHOD_NOTES[method],
        "base_kld": base,
        "positions": int(chunks.size),
        "reference_top_k": reference.k,
        "fixed_bytes": int(fixed_bytes),
        "tied_embedding": list(layout.tied_embedding) if layout.tied_embedding else None,
        "groups": _groups(layout, added, local, calibration),
        **({"calibration": calibration.rows} if calibration else {}),
        "probes": 1 + len(added),
        "seconds": round(time.perf_counter() - start, 1),
    }
