"""Quality gates: limits from ``[gates]`` / ``--gate`` checked against one target's measurements,
and ``--compare-to``: regressions against an older report that exceed the measured noise."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, NamedTuple

from ..config import GatesConfig
from ..errors import ConfigError
from .stats import describe_paired, mover_change, paired_accuracy, paired_bootstrap_change


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


# ------------------------------------------------------------------------------------ --compare-to


def _combined(a: float, b: float) -> float:
    return math.sqrt(a * a + b * b)


NO_INTERVALS = (
    "--compare-to: a report without 95% intervals (written, or its bench stages cached, before edgeft "
    "recorded them): mean KLD is compared by the earlier rule (2 combined per-token standard errors, which "
    "understate the noise), top-1 agreement is not compared"
)
NO_QUESTION_IDS = (
    "--compare-to: the old report does not record which question each answer belongs to: task accuracy "
    "is compared unpaired, by the earlier rule (2 combined binomial standard errors)"
)

# metric → its interval key, its per-sequence sum, whether up is worse
_FIDELITY = {
    "kl_divergence_mean": ("kl_divergence_interval", "kld_sum", True),
    "top1_agreement": ("top1_agreement_interval", "top1", False),
}


def _fidelity_change(
    metric: str, nf: dict, of: dict, same_questions: bool, notes: dict[str, None]
) -> tuple[float, float, float, float, str] | None:
    """(old, new, change lo, change hi, how) of ``metric`` from the best evidence both reports hold;
    None when they hold too little (a note says so)."""
    iv_key, sums, _ = _FIDELITY[metric]
    old, new = of.get(metric), nf.get(metric)
    if old is None or new is None:
        return None
    o_seq, n_seq = of.get("per_sequence"), nf.get("per_sequence")
    if same_questions and o_seq and n_seq and o_seq.get("positions") == n_seq.get("positions"):
        _, (lo, hi) = paired_bootstrap_change(o_seq[sums], n_seq[sums], n_seq["positions"])
        return old, new, lo, hi, f"paired bootstrap over the {len(n_seq['positions'])} sequences both reports scored"
    if of.get(iv_key) and nf.get(iv_key):
        lo, hi = mover_change(old, of[iv_key], new, nf[iv_key])
        return old, new, lo, hi, "MOVER from the two reports' 95% intervals (unpaired: different sequences)"
    notes[NO_INTERVALS] = None
    if metric != "kl_divergence_mean":
        return None
    tol = 2 * _combined(nf.get("kl_divergence_se", 0), of.get("kl_divergence_se", 0))
    change = new - old
    return old, new, change - tol, change + tol, "old report without intervals: 2 combined standard errors"


def _answers_by_question(report: dict, entry: dict) -> dict[str, bool] | None:
    ids = report.get("eval", {}).get("question_ids")
    answers = entry.get("answers") or []
    if not ids or len(ids) != len(answers) or not all("correct" in a for a in answers):
        return None
    return {i: bool(a["correct"]) for i, a in zip(ids, answers)}


def regressions(
    new: dict[str, Any], old: dict[str, Any], compare_speed: bool = True, notes: list[str] | None = None
) -> list[dict[str, Any]]:
    """Figures of ``new`` worse than ``old`` beyond the noise both measured, per shared target.

    Mean KLD (up) and top-1 agreement (down): the 95% interval of the change excludes zero — a
    paired bootstrap when both reports scored the same sequences, else MOVER from each report's own
    interval. Task accuracy: paired by question (the old and new artifact's right/wrong on the same
    questions), a regression when the Bonett–Price interval of the change lies below zero. Old
    reports without intervals or question ids fall back to the earlier rules (KLD: 2 combined
    standard errors; task accuracy: 2 combined binomial standard errors; top-1: not compared) and a
    line in ``notes`` says so. Perplexity: the increase exceeds both standard errors combined.
    Speeds: the new max is below the old min (the repetition ranges do not overlap); peak RSS: more
    than 5% higher. ``compare_speed=False`` (reports from two different machines) compares fidelity only.
    """
    said: dict[str, None] = {}  # notes, once each, in order
    old_targets = {t["target"]: t for t in old.get("targets", [old])}
    new_ids, old_ids = new.get("eval", {}).get("question_ids"), old.get("eval", {}).get("question_ids")
    same_questions = bool(new_ids) and new_ids == old_ids
    out: list[dict[str, Any]] = []
    for entry in new.get("targets", [new]):
        prev = old_targets.get(entry["target"])
        if prev is None:
            continue
        flag = _flagger(out, entry["target"])
        _fidelity_regressions(entry["fidelity"], prev["fidelity"], same_questions, said, flag)
        _task_regression(new, old, entry, prev, flag, said)
        if compare_speed:
            _speed_regressions(entry, prev, flag)
    if notes is not None:
        notes.extend(said)
    return out


def _flagger(out: list[dict[str, Any]], target_name: str) -> Callable[..., None]:
    """``flag(metric, before, after, allowed, rule, interval=None, target=...)``: one regression row into ``out``."""

    def flag(
        metric: str,
        before: float,
        after: float,
        allowed: float,
        rule: str,
        interval: list[float] | None = None,
        target: str = target_name,
    ) -> None:
        out.append(
            {
                "target": target,
                "metric": metric,
                "old": before,
                "new": after,
                "allowed": allowed,
                "regressed": True,
                "rule": rule,
                "interval": interval,
            }
        )

    return flag


def _fidelity_regressions(
    nf: dict[str, Any], of: dict[str, Any], same_questions: bool, said: dict[str, None], flag: Callable[..., None]
) -> None:
    """Perplexity, then each interval-judged fidelity figure (see :func:`regressions`)."""
    d = nf["perplexity_artifact"] - of["perplexity_artifact"]
    tol = _combined(nf.get("perplexity_artifact_err", 0), of.get("perplexity_artifact_err", 0))
    if d > tol:
        rule = "the increase exceeds the two standard errors combined"
        flag("perplexity_artifact", of["perplexity_artifact"], nf["perplexity_artifact"], tol, rule)
    for metric, (_, _, up_is_worse) in _FIDELITY.items():
        found = _fidelity_change(metric, nf, of, same_questions, said)
        if found is None:
            continue
        before, after, lo, hi = found[:4]
        change = after - before
        if (lo > 0) if up_is_worse else (hi < 0):
            allowed = max(0.0, change - lo if up_is_worse else hi - change)
            rule = f"change {change:+.4g}, 95% CI {lo:+.4g} to {hi:+.4g} ({found[4]}): beyond the noise"
            flag(metric, before, after, allowed, rule, [lo, hi])


def _speed_regressions(entry: dict[str, Any], prev: dict[str, Any], flag: Callable[..., None]) -> None:
    for key in ("decode_tok_s", "prefill_tok_s"):
        a, b = entry["latency"].get("artifact", {}).get(key), prev["latency"].get("artifact", {}).get(key)
        if a and b and a["max"] < b["min"]:
            rule = "the new runs' fastest is slower than the old runs' slowest"
            flag(key, b["median"], a["median"], b["min"] - b["median"], rule)
    a, b = entry.get("memory", {}).get("peak_rss_bytes"), prev.get("memory", {}).get("peak_rss_bytes")
    if a and b and a > 1.05 * b:
        flag("peak_rss_bytes", b, a, 0.05 * b, "more than 5% above the old peak")


def _task_regression(new: dict, old: dict, entry: dict, prev: dict, flag: Callable, notes: dict[str, None]) -> None:
    """Task accuracy of the new artifact against the old one: paired by question where both reports
    say which question each answer belongs to, else the earlier unpaired rule (and a note)."""
    now, before = _answers_by_question(new, entry), _answers_by_question(old, prev)
    if now is not None and before is not None:
        shared = [q for q in now if q in before]
        if not shared:
            notes["--compare-to: the two reports share no held-out question: task accuracy not compared"] = None
            return
        if len(shared) < len(now):
            notes[f"--compare-to: task accuracy paired over the {len(shared)} questions both reports share"] = None
        p = paired_accuracy([before[q] for q in shared], [now[q] for q in shared])
        lo, hi = p["interval"]
        if hi < 0:
            acc_old = (p["both_right"] + p["right_to_wrong"]) / p["n"]
            acc_new = (p["both_right"] + p["wrong_to_right"]) / p["n"]
            rule = "paired by question: " + describe_paired(p, before="old report")
            flag("task_accuracy_artifact", acc_old, acc_new, hi - p["difference"], rule, [lo, hi])
        return
    notes[NO_QUESTION_IDS] = None
    nf, of = entry["fidelity"], prev["fidelity"]
    n = max(1, len(entry.get("answers", [])) or 1)
    p_new, p_old = nf["task_accuracy_artifact"], of["task_accuracy_artifact"]
    tol = 2 * _combined(math.sqrt(p_new * (1 - p_new) / n), math.sqrt(p_old * (1 - p_old) / n))
    if p_old - p_new > tol:
        flag(
            "task_accuracy_artifact",
            p_old,
            p_new,
            tol,
            "old report without question ids: 2 combined binomial standard errors",
        )
