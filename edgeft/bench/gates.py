"""Quality gates: limits from ``[gates]`` checked against a report's measurements."""

from __future__ import annotations

from typing import Any, Callable

from ..config import GatesConfig

# gate name → (report value getter, "max" or "min", human description)
GATES: dict[str, tuple[Callable[[dict], Any], str, str]] = {
    "max_kld": (lambda r: r["fidelity"]["kl_divergence_mean"], "max", "mean KL divergence"),
    "min_top1": (lambda r: r["fidelity"]["top1_agreement"], "min", "top-1 agreement"),
    "max_ppl_delta_pct": (lambda r: r["fidelity"]["perplexity_delta_pct"], "max", "perplexity delta %"),
    "min_task_accuracy_ratio": (
        lambda r: r["fidelity"]["task_accuracy_artifact"] / r["fidelity"]["task_accuracy_reference"]
        if r["fidelity"]["task_accuracy_reference"] else None,
        "min",
        "task accuracy / reference",
    ),
    "min_decode_tok_s": (lambda r: r["latency"]["decode_tok_s"], "min", "decode tokens/s"),
    "max_size_mb": (lambda r: r["artifact"]["size_bytes"] / 1e6, "max", "size MB"),
}


def evaluate_gates(report: dict[str, Any], gates: GatesConfig) -> list[dict[str, Any]]:
    """One entry per configured gate: name, limit, measured value, passed."""
    out = []
    for name, (get, kind, what) in GATES.items():
        limit = getattr(gates, name)
        if limit is None:
            continue
        value = get(report)
        ok = value is not None and (value <= limit if kind == "max" else value >= limit)
        out.append({"name": name, "description": what, "limit": limit, "value": value, "passed": bool(ok)})
    return out
