"""Quality gates: limits from ``[gates]`` / ``--gate`` checked against one target's measurements,
and ``--compare-to``: regressions against an older report that exceed the measured spread."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from ..config import GatesConfig
from ..errors import ConfigError
from .stats import describe_paired


def _ratio(e: dict) -> float | None:
    ref = e["fidelity"]["task_accuracy_reference"]
    return e["fidelity"]["task_accuracy_artifact"] / ref if ref else None


def _paired(e: dict) -> dict | None:
    return e["fidelity"].get("task_accuracy_paired")


def _drop_bound(e: dict) -> float | None:
    """The upper 95% bound of reference − artifact task accuracy: the largest drop the data allow."""
    p = _paired(e)
    return None if p is None else -p["interval"][0]


def _flips(e: dict) -> int | None:
    p = _paired(e)
    return None if p is None else p["right_to_wrong"]


def _paired_detail(e: dict) -> str | None:
    p = _paired(e)
    return None if p is None else describe_paired(p)


def _interval_detail(metric: str, fmt: str) -> Callable[[dict], str | None]:
    def detail(e: dict) -> str | None:
        iv = e["fidelity"].get(f"{metric}_interval")
        if not iv:
            return None
        return (
            f"95% CI {fmt.format(iv[0])} to {fmt.format(iv[1])} ({e['fidelity'].get('interval_method', 'bootstrap')})"
        )

    return detail


class Gate(NamedTuple):
    get: Callable[[dict], Any]  # the measured value on a target entry
    kind: str  # "max" | "min" | "true"
    what: str
    detail: Callable[[dict], str | None] = lambda e: None  # the evidence behind the value, in words


GATES: dict[str, Gate] = {
    "max_kld": Gate(
        lambda e: e["fidelity"]["kl_divergence_mean"],
        "max",
        "mean KL divergence",
        _interval_detail("kl_divergence", "{:.4g}"),
    ),
    "min_top1": Gate(
        lambda e: e["fidelity"]["top1_agreement"],
        "min",
        "top-1 agreement",
        _interval_detail("top1_agreement", "{:.4f}"),
    ),
    "max_ppl_delta_pct": Gate(lambda e: e["fidelity"]["perplexity_delta_pct"], "max", "perplexity delta %"),
    "min_task_accuracy_ratio": Gate(_ratio, "min", "task accuracy / reference", _paired_detail),
    "max_task_accuracy_drop": Gate(
        _drop_bound, "max", "task accuracy drop vs reference, upper 95% bound", _paired_detail
    ),
    "max_flips": Gate(_flips, "max", "questions right→wrong vs reference", _paired_detail),
    "min_decode_tok_s": Gate(lambda e: e["latency"]["decode_tok_s"], "min", "decode tokens/s"),
    "max_peak_rss_mb": Gate(lambda e: e["memory"]["peak_rss_bytes"] / 1e6, "max", "peak RSS MB"),
    "max_size_mb": Gate(lambda e: e["artifact"]["size_bytes"] / 1e6, "max", "size MB"),
    "golden_must_stop": Gate(lambda e: all(g["artifact_stopped"] for g in e["golden"]), "true", "golden answers stop"),
    "golden_must_be_correct": Gate(
        lambda e: all(g["artifact_correct"] for g in e["golden"]), "true", "golden answers correct"
    ),
}


def evaluate_gates(entry: dict[str, Any], gates: GatesConfig) -> list[dict[str, Any]]:
    """One result per configured gate: name, limit, measured value, passed (and the evidence, in words,
    where the value comes with an interval)."""
    out = []
    for name, gate in GATES.items():
        limit = getattr(gates, name)
        if limit is None or limit is False:
            continue
        value = gate.get(entry)
        if gate.kind == "true":
            ok = bool(value)
        else:
            ok = value is not None and (value <= limit if gate.kind == "max" else value >= limit)
        result = {"name": name, "description": gate.what, "limit": limit, "value": value, "passed": bool(ok)}
        if detail := gate.detail(entry):
            result["detail"] = detail
        out.append(result)
    return out


def parse_gate_flags(flags: tuple[str, ...], gates: GatesConfig) -> GatesConfig:
    """Apply ``--gate name=value`` flags on top of the config's ``[gates]``."""
    from dataclasses import replace

    updates: dict[str, Any] = {}
    for flag in flags:
        name, sep, raw = flag.partition("=")
        if not sep or name not in GATES:
            raise ConfigError(f"--gate {flag!r}: expected NAME=VALUE with NAME one of {', '.join(GATES)}")
        if GATES[name].kind == "true":
            if raw.lower() not in ("true", "false"):
                raise ConfigError(f"--gate {name}: expected true or false, got {raw!r}")
            updates[name] = raw.lower() == "true"
        elif name in GatesConfig.WHOLE_NUMBERS:
            try:
                updates[name] = int(raw)
            except ValueError:
                raise ConfigError(f"--gate {name}: expected a whole number, got {raw!r}") from None
        else:
            try:
                updates[name] = float(raw)
            except ValueError:
                raise ConfigError(f"--gate {name}: expected a number, got {raw!r}") from None
    try:
        return replace(gates, **updates)
    except ConfigError as e:
        raise ConfigError(f"--gate: {e}") from None


def _combined(a: float, b: float) -> float:
    return math.sqrt(a * a + b * b)


def regressions(new: dict[str, Any], old: dict[str, Any], compare_speed: bool = True) -> list[dict[str, Any]]:
    """Figures of ``new`` worse than ``old`` by more than their measured spread, per shared target.

    Speeds: the new max is below the old min (the repetition ranges do not overlap). Perplexity:
    the increase exceeds both standard errors combined; KLD: 2 combined standard errors; task
    accuracy: the drop exceeds 2 combined binomial standard errors; peak RSS: more than 5% higher.
    ``compare_speed=False`` (reports from two different machines) compares fidelity only.
    """
    old_targets = {t["target"]: t for t in old.get("targets", [old])}
    out = []
    for entry in new.get("targets", [new]):
        prev = old_targets.get(entry["target"])
        if prev is None:
            continue

        def flag(metric: str, before: float, after: float, allowed: float, target: str = entry["target"]) -> None:
            out.append(
                {
                    "target": target,
                    "metric": metric,
                    "old": before,
                    "new": after,
                    "allowed": allowed,
                    "regressed": True,
                }
            )

        nf, of = entry["fidelity"], prev["fidelity"]
        d = nf["perplexity_artifact"] - of["perplexity_artifact"]
        tol = _combined(nf.get("perplexity_artifact_err", 0), of.get("perplexity_artifact_err", 0))
        if d > tol:
            flag("perplexity_artifact", of["perplexity_artifact"], nf["perplexity_artifact"], tol)
        tol = 2 * _combined(nf.get("kl_divergence_se", 0), of.get("kl_divergence_se", 0))
        if nf["kl_divergence_mean"] - of["kl_divergence_mean"] > tol:
            flag("kl_divergence_mean", of["kl_divergence_mean"], nf["kl_divergence_mean"], tol)
        n = max(1, len(entry.get("answers", [])) or 1)
        p_new, p_old = nf["task_accuracy_artifact"], of["task_accuracy_artifact"]
        tol = 2 * _combined(math.sqrt(p_new * (1 - p_new) / n), math.sqrt(p_old * (1 - p_old) / n))
        if p_old - p_new > tol:
            flag("task_accuracy_artifact", p_old, p_new, tol)
        if not compare_speed:
            continue
        for key in ("decode_tok_s", "prefill_tok_s"):
            a, b = entry["latency"].get("artifact", {}).get(key), prev["latency"].get("artifact", {}).get(key)
            if a and b and a["max"] < b["min"]:
                flag(key, b["median"], a["median"], b["min"] - b["median"])
        a, b = entry.get("memory", {}).get("peak_rss_bytes"), prev.get("memory", {}).get("peak_rss_bytes")
        if a and b and a > 1.05 * b:
            flag("peak_rss_bytes", b, a, 0.05 * b)
    return out
