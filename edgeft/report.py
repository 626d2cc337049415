"""report.json (the contract CI and other tools read), report.md, junit.xml and the plots.

report.json, ``schema_version`` 2 (version 1 keys are all still there, same meaning):

* ``target``, ``artifact``, ``fidelity``, ``latency``, ``memory``, ``roofline``, ``golden``,
  ``gates`` — the *first* target's entry, so one-target consumers need not look further;
* ``passed`` — every gate of every target passed (and no ``--compare-to`` regression);
* ``targets`` — one entry per target, each with the keys above plus ``passed``;
* ``ladder`` — fidelity of every stage against the fine-tuned reference (fp32, or bf16 where fp32 did
  not fit this machine: ``reference.dtype``; torch rows' ``quant`` is the dtype they ran in): ``base``, for QLoRA
  builds ``adapter on NF4 base`` (the adapter on its 4-bit base in torch, the model as trained; quant
  ``nf4``), ``reference``, each format's unquantized export (``gguf-f32 export``) and each target;
* ``reference.{path, size_bytes, dtype, top_k, task_accuracy, perplexity, performance}``: ``dtype``
  ``float32`` or ``bfloat16`` (the weights in ``path`` are fp32 either way), and ``dtype_reason`` where
  it is not float32 (e.g. ``fp32 would need 33.0 GB, this machine has 25.8 GB``);
* ``regressions`` (with ``--compare-to``), ``machine``, ``eval``;
* ``stages``: per stage ``{stage, seconds, cached, start_rss_bytes, peak_rss_bytes, peak_anon_bytes,
  estimated_peak_ram_bytes}`` — the build process's RSS at the start, its peak (the kernel's, file
  pages included) and its peak anonymous memory (sampled: what the resource plan's estimate counts);
* ``training`` (builds): ``method``, ``steps``, ``validation`` (``{source, examples}``: the
  ``[data].validation`` file or ``held out of the training data``; null without validation),
  ``eval_steps``, ``train_loss_history`` and ``eval_loss_history`` (``[{step, loss}]``; train loss is
  the mean over each logging interval), ``best_step`` and ``best_eval_loss`` (the adapter that was
  kept), ``final_is_best`` (null without validation); ``loss.png`` beside the report draws them;
* ``merge`` (builds): the merge stage's results: ``strategy`` (``fp`` / ``dequant``), and where it was
  chosen by ``auto``, ``kld_vs_adapter_on_nf4_base.{fp, dequant}``, ``kld_tokens``, ``kld_conversations``;
* ``machine`` — CPU model, cores, ISA features (AVX2, AVX-512, VNNI, AMX, NEON, dotprod, i8mm), RAM
  and each runtime's build (``runtime_builds``: llama.cpp's system info, torch's CPU kernels);
* ``device`` (with ``edgeft bench --device``): ``profile`` (the profile file's fields, sources
  included), ``projected: true``, ``context_tokens`` and per target ``{fits, format_supported,
  ram_needed_bytes, app_ram_bytes, decode_tok_s (the estimate), decode_tok_s_low, decode_tok_s_high,
  decode_tok_s_ceiling, decode_basis (fit / prior / ceiling, see edgeft.decode_model), decode_model,
  prefill_tok_s: null, method}`` — projections, never mixed into the measured sections;
* ``run_id`` and ``warnings``: every speed row has ``timed.{run_id, timed_at, machine}``; rows timed
  in another run than this report's are marked in report.md. A build also warns about each target
  whose mean KLD from the fine-tuned model is at least half the base model's (quantizing lost much
  of the fine-tune: :func:`fine_tune_lost`).

Per entry: ``artifact.{path, format, runtime, quant, file_type, size_bytes, sha256, tensor_types}``;
``fidelity.{kl_divergence_mean, kl_divergence_p99, kl_divergence_se, top1_agreement,
perplexity_reference(_err), perplexity_artifact(_err), perplexity_delta_pct, task_accuracy_base,
task_accuracy_reference, task_accuracy_artifact, artifact_stop_rate}`` (fractions 0–1);
``fidelity.{kl_divergence_interval, top1_agreement_interval}`` (95%, ``[lo, hi]``, bootstrap over
sequences; ``interval_method`` says how) and ``fidelity.per_sequence.{positions, kld_sum, top1}``
(what they resample); ``fidelity.task_accuracy_paired.{n, both_right, right_to_wrong,
wrong_to_right, both_wrong, difference, interval, confidence, p_value, method}`` — the artifact's
right/wrong against the reference's on the same questions (difference = artifact − reference; see
:mod:`edgeft.bench.stats`); ``answers[i].correct`` per question, in the order of
``eval.question_ids`` (a hash of each question and its accepted answers), and the reference's in
``reference.answers_correct``, so a later report can pair question by question. Ladder rows carry
the intervals and ``task_accuracy_paired`` too. These keys are absent from reports (and bench stages
cached) before they were added; readers treat them as optional. Gates may carry ``detail``: the
evidence behind the value in words (the interval, the flips).
``latency.{threads, decode_tok_s, reference_decode_tok_s, speedup, prefill_tok_s, ttft_ms}``
(medians) with the full spreads under ``latency.artifact`` / ``latency.reference``;
``memory.{peak_rss_bytes, load_s, reference_peak_rss_bytes}``;
``roofline.{read_bandwidth_gb_s, bytes_per_token, decode_tok_s_ceiling_projected, fraction}``.

In code the report is a :class:`Report` of :class:`TargetEntry` (built from each target's
:class:`BenchResult`); its ``to_json()`` is report.json, and ``Report.from_json`` reads one back
(``refold``, ``--compare-to``, a device's report over ``--remote``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from . import __version__
from .bench import device_runs
from .bench.bandwidth import decode_roofline
from .bench.device_state import fastest_clock, hottest
from .bench.stats import describe_paired, paired_accuracy
from .config import DTYPE_SHORT
from .decode_model import describe_range
from .errors import ConfigError
from .files import save_figure, write_atomic
from .formats import default_runtime
from .machine import same_machine, summary
from .training_report import LOSS_PLOT, markdown_section, write_loss_plot

SCHEMA_VERSION = 2

# ------------------------------------------------------------------------------------------- types
#
# The report's parts as types, each with one to_json() (report.json's dict, its keys in the order
# above) and from_json() (a dict read back: a stored report, a device's, a bench stage's results).
# Sections below the top level (artifact, fidelity, latency, …) stay JSON objects. A field that is
# None was absent and is not written: reports and cached stages from before a key was added load,
# and write back as they were. Keys this edgeft does not know (a newer one's, another tool's) are
# kept in ``extra`` and written after the known ones.


def _known(cls: Any) -> list[str]:
    return [f.name for f in fields(cls) if f.name != "extra"]


def _split(cls: Any, d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the known fields' values, None where absent; the keys ``cls`` does not know)."""
    names = _known(cls)
    return {n: d.get(n) for n in names}, {k: v for k, v in d.items() if k not in names}


def _present(obj: Any, names: list[str]) -> dict[str, Any]:
    return {n: getattr(obj, n) for n in names if getattr(obj, n) is not None}


@dataclass
class BenchResult:
    """A bench stage's results (its manifest's ``results``): an artifact's measurements against the
    stored reference; the torch rows (bench-base, bench-adapter-nf4) hold fidelity and answers only."""

    artifact: dict[str, Any] | None = None  # path, format, runtime, file_type, size_bytes, sha256, tensor_types
    fidelity: dict[str, Any] | None = None
    answers: list[dict[str, Any]] | None = None  # per held-out question: reply, correct, stopped
    performance: dict[str, Any] | None = None  # the probe's: latency spreads, peak RSS, load time, timing
    roofline: dict[str, Any] | None = None  # bytes_per_token (the bandwidth is measured per report)
    machine: dict[str, Any] | None = None
    dtype: str | None = None  # torch rows: the dtype they ran in
    compute_dtype: str | None = None  # bench-adapter-nf4: its 4-bit base's compute dtype
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**_present(self, _known(BenchResult)), **self.extra}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BenchResult:
        known, extra = _split(cls, d)
        return cls(**known, extra=extra)


@dataclass
class TargetEntry:
    """One target's entry in ``targets`` (the first one's sections are repeated at the top)."""

    target: str
    artifact: dict[str, Any]
    fidelity: dict[str, Any]
    latency: dict[str, Any]
    memory: dict[str, Any]
    roofline: dict[str, Any]
    golden: list[dict[str, Any]]
    answers: list[dict[str, Any]] | None = None
    gates: list[dict[str, Any]] | None = None  # None until judged
    passed: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**_present(self, _known(TargetEntry)), **self.extra}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TargetEntry:
        known, extra = _split(cls, d)
        return cls(**known, extra=extra)


# the first target's sections, repeated at the top of report.json (its gates come after run_id)
_FIRST = ("target", "artifact", "fidelity", "latency", "memory", "roofline", "golden")


@dataclass
class Report:
    """report.json. ``first_at_top``: the first target's sections are repeated at the top (every
    report this edgeft writes; False for one read back without them, so that it is written back so)."""

    reference: dict[str, Any] | None
    targets: list[TargetEntry] | None  # None: a version 1 report (its one entry is at the top, in extra)
    ladder: list[dict[str, Any]] | None
    eval: dict[str, Any] | None
    machine: dict[str, Any] | None
    schema_version: int | None = SCHEMA_VERSION
    edgeft_version: str | None = __version__
    run_id: str | None = None
    warnings: list[str] | None = None
    regressions: list[dict[str, Any]] | None = None  # with --compare-to
    passed: bool | None = None
    device: dict[str, Any] | None = None  # with --device: projections
    device_runs: list[dict[str, Any]] | None = None
    stages: list[dict[str, Any]] | None = None
    merge: dict[str, Any] | None = None  # builds
    training: dict[str, Any] | None = None  # builds
    remote: dict[str, Any] | None = None  # --remote: where it was measured
    first_at_top: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        targets = None if self.targets is None else [t.to_json() for t in self.targets]
        first = targets[0] if targets and self.first_at_top else {}
        out = {
            **_present(self, ["schema_version", "edgeft_version"]),
            **{k: first[k] for k in _FIRST if k in first},
            **_present(self, ["reference"]),
            **({} if targets is None else {"targets": targets}),
            **_present(self, ["ladder", "eval", "machine", "run_id"]),
            **({"gates": first["gates"]} if "gates" in first else {}),
            **_present(self, _REPORT_TAIL),
        }
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Report:
        names = [n for n in _known(cls) if n != "first_at_top"]
        known, extra = {n: d.get(n) for n in names}, {k: v for k, v in d.items() if k not in names}
        if isinstance(known["targets"], list):  # version 2: the sections at the top are the first entry's
            extra = {k: v for k, v in extra.items() if k not in (*_FIRST, "gates")}
            known["targets"] = [TargetEntry.from_json(t) for t in known["targets"]]
        return cls(**known, first_at_top="target" in d, extra=extra)


# written after the gates, in this order
_REPORT_TAIL = [
    "warnings",
    "regressions",
    "passed",
    "device",
    "device_runs",
    "stages",
    "merge",
    "training",
    "remote",
]


# ----------------------------------------------------------------------------------------- writers


def roofline(bytes_per_token: int, decode_tok_s: float, bandwidth: dict[str, Any]) -> dict[str, Any]:
    """Decode speed against bandwidth ÷ bytes per token, with the best-of-N bandwidth (as STREAM
    reports the achievable figure: the median moved between 33 and 62 GB/s here with other load)."""
    ceiling = decode_roofline(bandwidth["max"], bytes_per_token)
    return {
        "read_bandwidth_gb_s": bandwidth,
        "bytes_per_token": bytes_per_token,
        "decode_tok_s_ceiling_projected": ceiling,
        "fraction": decode_tok_s / ceiling if ceiling else None,
    }


def timed(perf: dict[str, Any]) -> dict[str, Any]:
    """Which run and machine a timing comes from (absent in stages cached before edgeft 0.4)."""
    return {"run_id": perf.get("run_id"), "timed_at": perf.get("timed_at"), "machine": perf.get("machine")}


def question_id(example: dict[str, Any]) -> str:
    """A short stable id of a held-out question: its prompt and accepted answers (what right/wrong means)."""
    text = json.dumps({"prompt": example["messages"][:-1], "answers": example["answers"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def paired_task(ref_meta: dict[str, Any], answers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The artifact's right/wrong against the reference's, question by question (None without answers)."""
    ref = ref_meta.get("answers") or []
    if not ref or len(ref) != len(answers):
        return None
    return paired_accuracy([a["correct"] for a in ref], [a["correct"] for a in answers])


# A target whose mean KLD from the fine-tuned model is this share of the base model's has lost much
# of what fine-tuning changed, or the fine-tune changed less than quantizing does. Measured: SmolLM2
# cooking builds stay under 12% (onnx-int4 0.23 vs base 2.08); the Qwen2.5-Coder-0.5B built-in's
# Q4_K_M is at 51% and its Q4_0 at 164% (its weights were on a 4-bit grid before fine-tuning:
# docs/models.md); a 2-step SmolLM2 fine-tune (base 0.195) puts Q4_K_M at 24% and Q4_0 at 173%.
FINE_TUNE_LOST_SHARE = 0.5


def fine_tune_lost(entries: list[TargetEntry], base_fidelity: dict[str, Any] | None) -> list[str]:
    """A warning for each target at least half as far from the fine-tuned model as the base model is:
    a KLD gate may fail it too, but only this says that what quantizing lost is the fine-tune."""
    base_kld = (base_fidelity or {}).get("kl_divergence_mean")
    if not base_kld:
        return []
    warnings = []
    for e in entries:
        kld = e.fidelity["kl_divergence_mean"]
        share = kld / base_kld
        if share < FINE_TUNE_LOST_SHARE:
            continue
        how = (
            "is further from the fine-tuned model than the untuned base is"
            if share >= 1
            else f"is {share:.0%} as far from the fine-tuned model as the untuned base is"
        )
        accuracy = e.fidelity.get("task_accuracy_artifact"), base_fidelity.get("task_accuracy_artifact")
        task = (
            f"; task accuracy {accuracy[0]:.1%} (base {accuracy[1]:.1%}, fine-tuned {e.fidelity['task_accuracy_reference']:.1%})"
            if None not in accuracy and e.fidelity.get("task_accuracy_reference") is not None
            else ""
        )
        warnings.append(
            f"{e.target} ({e.artifact.get('quant')}): mean KLD {kld:.3g} against the base model's {base_kld:.3g}, "
            f"so it {how}: quantizing lost much of what fine-tuning changed{task}. A short fine-tune, or a "
            "base whose weights were 4-bit already (every built-in comes from a 4-bit GGUF), loses it "
            "this way: see docs/models.md"
        )
    return warnings


def target_entry(
    target: str,
    quant: str,
    measured: BenchResult,
    ref_meta: dict[str, Any],
    base_accuracy: float | None,
    golden: int,
    bandwidth: dict[str, Any],
) -> TargetEntry:
    """One target's report entry from its bench results and the stored reference."""
    perf, ref_perf = measured.performance, ref_meta["performance"]
    lat, ref_lat = perf["latency"], ref_perf["latency"]
    fidelity = dict(
        measured.fidelity,
        task_accuracy_base=base_accuracy,
        task_accuracy_paired=paired_task(ref_meta, measured.answers),
    )
    examples = ref_meta["examples"]
    golden_rows = [
        {
            "question": ex["messages"][-2]["content"],
            "expected": ex["messages"][-1]["content"],
            "reference": ref["reply"],
            "reference_correct": ref["correct"],
            "artifact": art["reply"],
            "artifact_correct": art["correct"],
            "artifact_stopped": art["stopped"],
        }
        for ex, ref, art in list(zip(examples, ref_meta["answers"], measured.answers))[:golden]
    ]
    return TargetEntry(
        target=target,
        artifact=dict(measured.artifact, quant=quant),
        fidelity=fidelity,
        latency={
            "threads": lat["threads"],
            "decode_tok_s": lat["decode_tok_s"]["median"],
            "reference_decode_tok_s": ref_lat["decode_tok_s"]["median"],
            "speedup": lat["decode_tok_s"]["median"] / ref_lat["decode_tok_s"]["median"],
            "prefill_tok_s": lat["prefill_tok_s"]["median"],
            "ttft_ms": lat["ttft_ms"]["median"],
            "artifact": lat,
            "reference": ref_lat,
            "timed": timed(perf),
            "device_state": perf.get("device_state"),  # pinning, temperature and clocks around the runs
            "sustained": perf.get("sustained"),  # with --sustained: first and last 20% of a long decode
        },
        memory={
            "peak_rss_bytes": perf["peak_rss_bytes"],
            "load_s": perf["load_s"],
            "reference_peak_rss_bytes": ref_perf["peak_rss_bytes"],
            "reference_load_s": ref_perf["load_s"],
        },
        roofline=roofline(measured.roofline["bytes_per_token"], lat["decode_tok_s"]["median"], bandwidth),
        golden=golden_rows,
        answers=measured.answers,
    )


def assemble(
    entries: list[TargetEntry],
    ref_dir: Path,
    ref_meta: dict[str, Any],
    ladder: list[dict[str, Any]],
    machine: dict[str, Any],
) -> Report:
    """The report of judged ``entries``, before the verdict and what each command adds."""
    return Report(
        reference={
            "path": ref_meta["model"],
            "stored": str(ref_dir),
            "size_bytes": ref_meta["model_size_bytes"],
            "dtype": ref_meta.get("dtype", "float32"),  # references stored before it was recorded: fp32
            **({"dtype_reason": ref_meta["dtype_reason"]} if ref_meta.get("dtype_reason") else {}),
            "top_k": ref_meta["top_k"],
            "task_accuracy": ref_meta["task_accuracy"],
            "answers_correct": [a["correct"] for a in ref_meta.get("answers", [])],
            "perplexity": ref_meta["perplexity"],
            "performance": ref_meta["performance"],
            "machine": ref_meta.get("machine"),
            "timed": timed(ref_meta["performance"]),
        },
        targets=entries,
        ladder=ladder,
        eval={
            "file": ref_meta["eval_file"],
            "examples": len(ref_meta["examples"]),
            "scored_positions": ref_meta["positions"],
            "question_ids": [question_id(ex) for ex in ref_meta["examples"]],
        },
        machine=machine,
    )


def ladder_row(
    stage: str, runtime: str, fidelity: dict[str, Any], size_bytes: int | None, quant: str
) -> dict[str, Any]:
    keys = (
        "kl_divergence_mean",
        "kl_divergence_p99",
        "top1_agreement",
        "perplexity_artifact",
        "perplexity_artifact_err",
        "perplexity_delta_pct",
        "task_accuracy_artifact",
        "kl_divergence_interval",
        "top1_agreement_interval",
        "task_accuracy_paired",
    )
    return {
        "stage": stage,
        "runtime": runtime,
        "quant": quant,
        "size_bytes": size_bytes,
        **{k: fidelity.get(k) for k in keys},
    }


# ---------------------------------------------------------------------------------------------- md


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _spread(s: dict[str, float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}–{fmt.format(s['max'])}]"


# Free text in report.md may come from another machine (a device's CPU name, warnings, runtime builds,
# target names; see edgeft.untrusted): it is rendered so that it stays text on its own line. _md
# backslash-escapes what markdown acts on within a line: '|' (table cells), '<' and '>' (HTML), '[' and
# ']' (links, images that load a URL), '`' (code spans) and '\\' itself; line breaks become spaces, so
# no text starts a heading or a row. _code puts text in a code span whose fence is longer than any
# backtick run inside it (inside code spans escapes are literal).


def _md(text: Any) -> str:
    text = " ".join(str(text).splitlines())
    return "".join("\\" + c if c in "\\`|<>[]" else c for c in text)


def _code(text: Any) -> str:
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""  # a span drops one space each side
    return f"{fence}{pad}{text}{pad}{fence}"


def _cell(text: Any) -> str:
    return _md(text)


def dtype_short(dtype: Any) -> str:
    """``float32`` → ``fp32``, ``bfloat16`` → ``bf16``; anything else (another machine's) as safe text."""
    return DTYPE_SHORT.get(dtype or "float32") or _md(dtype)


def _reference_dtype_line(ref: dict[str, Any]) -> list[str]:
    """Why the reference is not fp32, where it is not: every figure below is measured against it."""
    if (ref.get("dtype") or "float32") == "float32":
        return []
    why = f" ({_md(ref['dtype_reason'])})" if ref.get("dtype_reason") else ""
    return [
        "",
        f"**Reference computed in {dtype_short(ref['dtype'])}**{why}: every row is measured against the "
        f"{dtype_short(ref['dtype'])} model, itself a little off the fp32 one (how much, measured on SmolLM2-135M: "
        "edgeft's docs/report.md, section A bf16 reference).",
    ]


def _interval(iv: list[float] | None, fmt: str) -> str:
    return "" if not iv else f" [{fmt.format(iv[0])}–{fmt.format(iv[1])}]"


def _task_change(p: dict[str, Any] | None) -> str:
    """Artifact − reference task accuracy in points with its paired 95% interval."""
    if not p:
        return "—"
    lo, hi = p["interval"]
    return f"{100 * p['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _flips(p: dict[str, Any] | None) -> str:
    return "—" if not p else f"{p['right_to_wrong']} / {p['wrong_to_right']}"


def _ladder_note(report: Report) -> str:
    rows = [r for r in report.ladder or [] if r.get("task_accuracy_paired")]
    n = rows[0]["task_accuracy_paired"]["n"] if rows else report.eval["examples"]
    return (
        "95% intervals: mean KLD and top-1 by a bootstrap over the held-out conversations (whole sequences, "
        "fixed seed); task accuracy paired with the reference question by question: Δ = row − reference in "
        f"points (Bonett–Price interval); flips = of the {n} questions, those the reference got right and "
        "this row wrong / wrong and right. An interval that spans 0 is a difference the eval set cannot tell "
        "from noise."
    )


def timed_in_run(number: int) -> str:
    """The mark on a speed timed in another run than the rows beside it, and on its footnote: one
    number per run, so rows measured under different load are not compared unawares."""
    return f"†{number}"


def render_markdown(report: Report, loss_plot: bool = False) -> str:
    """report.md; ``loss_plot``: loss.png was written beside it (a build's training section links it)."""
    ref_type = dtype_short(report.reference.get("dtype"))
    marks = _RunMarks(report.run_id)
    lines = _header_section(report, ref_type) + _ladder_section(report, ref_type)
    if report.training:
        lines += markdown_section(report.training, loss_plot)
    lines += _speed_section(report, ref_type, marks)
    lines += _cpu_state_section([{"target": t.target, "latency": t.latency} for t in report.targets])
    if report.device:
        lines += _device_section(report.device)
    if report.device_runs:
        lines += _device_runs_section(report.device_runs)
    lines += marks.footnotes(report) + _roofline_note(report)
    for t in report.targets:
        lines += _target_section(t)
    if report.regressions:
        lines += _regressions_section(report.regressions)
    if report.stages:
        lines += _stages_section(report.stages)
    return "\n".join(lines) + "\n"


class _RunMarks:
    """Daggers on speed rows timed in another run than this report's, one number per run, and the
    footnotes naming when and where each run was."""

    def __init__(self, run_id: Any):
        self.run_id = run_id
        self.earlier: dict[Any, dict[str, Any]] = {}  # run id -> the first row's timing from that run

    def mark(self, t: dict[str, Any]) -> str:
        if self.run_id is None or t.get("run_id") == self.run_id:
            return ""
        self.earlier.setdefault(t.get("run_id"), t)
        return " " + timed_in_run(list(self.earlier).index(t.get("run_id")) + 1)

    def footnotes(self, report: Report) -> list[str]:
        lines = []
        for i, t in enumerate(self.earlier.values(), 1):
            where = summary(t["machine"]) if t.get("machine") else "machine not recorded"
            other = "" if same_machine(t.get("machine"), report.machine) else " — **another machine**"
            lines += [
                "",
                f"{timed_in_run(i)} timed in an earlier run ({_md(t.get('timed_at') or 'before runs were recorded')}; {_md(where)}){other}.",
            ]
        if self.earlier:
            lines += [
                "",
                "Speeds of rows from different runs compare with care: load on the machine differs between runs.",
            ]
        return lines


def _header_section(report: Report, ref_type: str) -> list[str]:
    ref, machine = report.reference, report.machine or {}
    return [
        f"# edgeft report — {', '.join(_md(t.target) for t in report.targets)}",
        "",
        f"**{'PASSED' if report.passed else 'FAILED'}** · reference {_code(ref['path'])} "
        f"({ref['size_bytes'] / 1e6:.0f} MB fp32{'' if ref_type == 'fp32' else f', computed in {ref_type}'}) · "
        f"{report.eval['examples']} held-out questions, "
        f"{report.eval['scored_positions']} scored reply tokens · KLD over the reference's top-{ref['top_k']} + tail",
        *_reference_dtype_line(ref),
        "",
        *[f"**Warning:** {_md(w)}" for w in report.warnings or []],
        *([""] if report.warnings else []),
        f"Machine: {_md(summary(machine))}"
        if machine.get("cpu_model")
        else f"Machine: {_md(machine.get('platform', 'unknown'))}",
        *(
            [f"(the device: measured there over SSH, {_code('edgeft bench --remote ' + report.remote['host'])})"]
            if report.remote
            else []
        ),
        "",
        *[f"- {_md(name)}: {_code(build)}" for name, build in machine.get("runtime_builds", {}).items()],
    ]


def _ladder_section(report: Report, ref_type: str) -> list[str]:
    lines = [
        "",
        f"## Fidelity ladder (each stage vs the fine-tuned {ref_type} reference; base = before fine-tuning)",
        "",
        "| stage | runtime | type | MB | mean KLD [95% CI] | p99 KLD | top-1 [95% CI] | perplexity | Δppl | task acc "
        "| Δ task acc, points [95% CI] | flips ✓→✗ / ✗→✓ |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.ladder or []:
        size = "" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.1f}"
        task = r.get("task_accuracy_paired")
        lines.append(
            f"| {_md(r['stage'])} | {_md(r['runtime'])} | {_md(r['quant'])} | {size} | {r['kl_divergence_mean']:.5f}"
            f"{_interval(r.get('kl_divergence_interval'), '{:.5f}')} | {r['kl_divergence_p99']:.4f} | "
            f"{_pct(r['top1_agreement'])}{_interval(r.get('top1_agreement_interval'), '{:.1%}')} | "
            f"{r['perplexity_artifact']:.3f} ± {r['perplexity_artifact_err']:.3f} | {r['perplexity_delta_pct']:+.1f}% | "
            f"{_pct(r['task_accuracy_artifact'])} | {_task_change(task)} | {_flips(task)} |"
        )
    lines += ["", _ladder_note(report)]
    if kld := (report.merge or {}).get("kld_vs_adapter_on_nf4_base"):
        figures = ", ".join(f"`{k}` {v:.4g}" for k, v in kld.items())
        lines += [
            "",
            f"QLoRA merge: `{report.merge['strategy']}` kept (mean KLD vs the adapter on the NF4 base: {figures}).",
        ]
    return lines


def _speed_section(report: Report, ref_type: str, marks: _RunMarks) -> list[str]:
    ref = report.reference
    ref_lat = ref["performance"]["latency"]
    lines = [
        "",
        f"## Speed and memory ({ref_lat['threads']} threads; median [min–max] after a warm-up, "
        f"{ref_lat['repeats']} runs for the reference, {report.targets[0].latency['artifact']['repeats']} per artifact; "
        f"{ref_lat['prompt_tokens']}-token prompt, {ref_lat['decode_tokens']} decoded tokens)",
        "",
        f"| model | runtime | TTFT ms | prefill tok/s | decode tok/s | × {ref_type} | peak RSS MB | load s | roofline |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| reference {ref_type}{marks.mark(ref.get('timed', {}))} | {_md(ref_lat['runtime_version'])} | {_spread(ref_lat['ttft_ms'], '{:.0f}')} | "
        f"{_spread(ref_lat['prefill_tok_s'], '{:.0f}')} | {_spread(ref_lat['decode_tok_s'])} | 1.0 | "
        f"{ref['performance']['peak_rss_bytes'] / 1e6:.0f} | {ref['performance']['load_s']:.2f} | |",
    ]
    for t in report.targets:
        lat, mem, roof, art = t.latency, t.memory, t.roofline, t.artifact
        a = lat["artifact"]
        lines.append(
            f"| {_md(t.target)} ({_md(art['quant'])}){marks.mark(lat.get('timed', {}))} | "
            f"{_md(art.get('runtime') or default_runtime(art.get('format')))} {_md(a['runtime_version'])} | {_spread(a['ttft_ms'], '{:.0f}')} | "
            f"{_spread(a['prefill_tok_s'], '{:.0f}')} | {_spread(a['decode_tok_s'])} | {lat['speedup']:.1f} | "
            f"{mem['peak_rss_bytes'] / 1e6:.0f} | {mem['load_s']:.2f} | {_pct(roof['fraction'])} |"
        )
    return lines


def _roofline_note(report: Report) -> list[str]:
    bw = report.targets[0].roofline["read_bandwidth_gb_s"]
    return [
        "",
        f"Roofline: decode tok/s as a fraction of the best measured read bandwidth ({bw['max']:.1f} GB/s; median "
        f"[min–max] {_spread(bw)}) ÷ weight bytes read per token (a projected ceiling, not a measurement).",
    ]


def _target_section(t: TargetEntry) -> list[str]:
    art, fid = t.artifact, t.fidelity
    types = ", ".join(f"{_md(k)}×{_md(v)}" for k, v in art.get("tensor_types", {}).items())
    lines = [
        "",
        f"## {_md(t.target)} — {'passed' if t.passed else '**FAILED**'}",
        "",
        f"{_code(art['path'])} · {art['size_bytes'] / 1e6:.1f} MB · tensor types written: {types}",
        f" · answers ending on a stop token: {_pct(fid.get('artifact_stop_rate'))}",
    ]
    if task := fid.get("task_accuracy_paired"):
        lines += [
            "",
            f"Task accuracy {_pct(fid.get('task_accuracy_reference'))} (reference) → "
            f"{_pct(fid.get('task_accuracy_artifact'))}: {_md(describe_paired(task))}.",
        ]
    if t.gates:
        lines += _gates_table(t.gates, task)
    if t.golden:
        lines += _golden_table(t.golden)
    return lines


def _gates_table(gates: list[dict[str, Any]], task: dict[str, Any] | None) -> list[str]:
    lines = ["", "| gate | limit | value | result | evidence |", "|---|---:|---:|---|---|"]
    for g in gates:
        value = (
            "n/a" if g["value"] is None else (str(g["value"]) if isinstance(g["value"], bool) else f"{g['value']:.4g}")
        )
        detail = g.get("detail", "")
        if task and detail == describe_paired(task):
            detail = "the paired comparison above"
        lines.append(
            f"| {_md(g['description'])} ({_md(g['name'])}) | {_md(g['limit'])} | {value} | "
            f"{'pass' if g['passed'] else '**FAIL**'} | {_md(detail)} |"
        )
    return lines


def _golden_table(golden: list[dict[str, Any]]) -> list[str]:
    lines = ["", "| golden prompt | expected | reference | artifact | stopped |", "|---|---|---|---|---|"]
    for g in golden:
        mark = lambda ok: "✓ " if ok else "✗ "  # noqa: E731
        lines.append(
            f"| {_cell(g['question'])} | {_cell(g['expected'])} | {mark(g['reference_correct'])}{_cell(g['reference'])} | "
            f"{mark(g['artifact_correct'])}{_cell(g['artifact'])} | {'yes' if g['artifact_stopped'] else '**no**'} |"
        )
    return lines


def _regressions_section(found: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Regressions against the previous report",
        "",
        "| target | metric | old | new | allowed | why |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in found:
        lines.append(
            f"| {_md(r['target'])} | {_md(r['metric'])} | {r['old']:.4g} | {r['new']:.4g} | {r['allowed']:.3g} "
            f"| {_md(r.get('rule', ''))} |"
        )
    return lines


def _stages_section(stages: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Stages",
        "",
        "Peak RSS is the build process's own over the stage; it starts from what earlier stages "
        "left (RSS at start). Of it, anonymous memory (sampled every 20 ms) is what must fit: the rest "
        "is file pages, such as mapped weights, that the kernel drops when memory is short; the "
        "estimate counts anonymous memory. Runtimes benched in their own processes report theirs above.",
        "",
        "| stage | seconds | cached | RSS at start MB | peak RSS MB | peak anonymous MB | estimated MB |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]

    def mb(value: Any) -> str:
        return "" if value is None else f"{value / 1e6:.0f}"

    for s in stages:
        lines.append(
            f"| {_md(s['stage'])} | {s['seconds']:.1f} | {'yes' if s['cached'] else 'no'} "
            f"| {mb(s.get('start_rss_bytes'))} | {mb(s.get('peak_rss_bytes'))} | {mb(s.get('peak_anon_bytes'))} "
            f"| {mb(s.get('estimated_peak_ram_bytes'))} |"
        )
    return lines


def _cpu_state_section(targets: list[dict[str, Any]]) -> list[str]:
    """Pinning, temperature and clock around each artifact's timed runs, and its sustained decode;
    nothing when none of it was recorded or readable (an x86 container has no thermal zones)."""

    def pair(state: dict[str, Any], read: Any, fmt: str) -> str:
        a, b = (read(state.get(k) or {}) for k in ("before", "after"))
        return (
            ""
            if a is None and b is None
            else f"{'–' if a is None else fmt.format(a)} → {'–' if b is None else fmt.format(b)}"
        )

    rows = []
    for t in targets:
        state, sus = t["latency"].get("device_state") or {}, t["latency"].get("sustained")
        pinned = (state.get("affinity") or {}).get("pinned_to")
        cells = [
            "cores " + ",".join(map(str, pinned)) if pinned else "",
            pair(state, hottest, "{:.0f}"),
            pair(state, fastest_clock, "{:.0f}"),
            ""
            if not sus
            else f"{sus['first']['tok_s']:.1f} → {sus['last']['tok_s']:.1f} ({sus['change_pct']:+.0f}%, {sus['seconds']:.0f} s)",
        ]
        if any(cells):
            rows.append(f"| {_md(t['target'])} | " + " | ".join(_md(c) for c in cells) + " |")
    if not rows:
        return []
    return [
        "",
        "CPU state around the timed runs (big.LITTLE: pinned to the big cores; hottest thermal zone and fastest "
        "core clock before → after; `--sustained`: decode tok/s of the first → last 20% of a continuous decode):",
        "",
        "| artifact | pinned | °C | MHz | sustained decode tok/s |",
        "|---|---|---:|---:|---:|",
        *rows,
    ]


def _device_section(device: dict[str, Any]) -> list[str]:
    p = device["profile"]
    lines = [
        "",
        f"## Projected on {_md(p['name'])} — projections from the device profile, not measurements",
        "",
        f"Profile {_code(p['key'])}: {_md(p['cores'])}, {_md(p['threads'])} threads, ISA {_md(' '.join(p['isa']))}; "
        f"app RAM {p['app_ram_gb']:g} GB ({_md(p['app_ram_source'])}); decode bandwidth "
        f"{p['effective_bandwidth_gb_s']:g} GB/s effective ({_md(p['effective_bandwidth_source'])}). Speeds and memory above were measured on this machine "
        f"with the device's thread count. Context for the RAM fit: {device['context_tokens']} tokens.",
        "",
        "| artifact | RAM needed MB (projected) | app RAM MB | fits (projected) | decode tok/s (projected range) | basis | decode tok/s measured here |",
        "|---|---:|---:|---|---:|---|---:|",
    ]
    methods = []
    for name, t in device["targets"].items():
        fits = "yes" if t["fits"] else ("**no**" if t["format_supported"] else "**no** (format not supported)")
        # reports written before the per-token model carry only the bandwidth-only figure: a ceiling
        decode = t.get("decode_model") or {"basis": "ceiling", "estimate": t["decode_tok_s"], "high": t["decode_tok_s"]}
        lines.append(
            f"| {_md(name)} | {t['ram_needed_bytes'] / 1e6:.0f} | {t['app_ram_bytes'] / 1e6:.0f} | {fits} | "
            f"{_md(describe_range(decode))} | {_md(decode.get('basis', ''))} | {t['measured_decode_tok_s_here']:.1f} |"
        )
        methods.append(f"- {_md(name)}: {_md(t.get('method', ''))}")
    lines += [
        "",
        "Decode model: each token costs a fixed time t0 plus its weight bytes ÷ a bandwidth. **fit**: t0 and "
        "bandwidth fitted to runs on the device (published, or `edgeft devices calibrate`), estimate [band: the "
        "fit's worst residual or the runs' spread, at least ±5%, doubled outside the fitted sizes]; **prior**: no "
        "fit for this runtime and thread count, from t0 taken from another device up to bandwidth alone; "
        "**ceiling**: bandwidth alone, an upper bound. RAM = peak RSS measured here + KV cache for context beyond "
        "the measured one. Prefill is compute-bound and not projected.",
        "",
        *methods,
    ]
    return lines


def _speed_cell(s: dict[str, Any] | None, fmt: str = "{:.1f}") -> str:
    """median [min–max] where samples are known; llama-bench files without samples give mean ± sd."""
    if not s:
        return ""
    if "median" in s:
        return _spread(s, fmt)
    sd = s.get("stddev")
    return fmt.format(s["mean"]) + ("" if sd is None else " ± " + fmt.format(sd)) + " (mean)"


def _device_runs_section(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Measured on other machines — each run's own figures, not comparable to the table above",
        "",
        "| machine | source | artifact | threads | prefill tok/s | decode tok/s | peak RSS MB | mean KLD | task acc |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, run in enumerate(runs, 1):
        m = run.get("machine") or {}
        where = m.get("cpu_model") or "machine not recorded"
        if m.get("cores"):
            where += f", {m['cores']} cores"
        if m.get("ram_bytes"):
            where += f", {m['ram_bytes'] / 2**30:.0f} GiB"
        for r in run["rows"]:
            art = r["target"] or f"{r.get('model')} (not in this build)"
            pre, dec = r.get("prefill") or {}, r.get("decode") or {}
            pre_cell = _speed_cell(pre.get("tok_s"), "{:.0f}") + (
                f" (pp{_md(pre['tokens'])})" if pre.get("tokens") else ""
            )
            dec_cell = _speed_cell(dec.get("tok_s")) + (f" (tg{_md(dec['tokens'])})" if dec.get("tokens") else "")
            rss = "" if r.get("peak_rss_bytes") is None else f"{r['peak_rss_bytes'] / 1e6:.0f}"
            kld = "" if r.get("kl_divergence_mean") is None else f"{r['kl_divergence_mean']:.4f}"
            lines.append(
                f"| {_cell(where)} [{i}] | {_cell(run['source'])} | {_cell(art)} | {_md(r.get('threads') or '')} | "
                f"{pre_cell} | {dec_cell} | {rss} | {kld} | {_pct(r.get('task_accuracy')) if r.get('task_accuracy') is not None else ''} |"
            )
    lines.append("")
    for i, run in enumerate(runs, 1):
        builds = "; ".join(
            f"{_md(k)}: {_code(v)}" for k, v in (run.get("machine") or {}).get("runtime_builds", {}).items()
        )
        lines.append(
            f"[{i}] measured {_md(run.get('measured_at') or 'at an unknown time')}, imported {_md(run.get('imported_at'))}"
            + (f" from {_code(run['file'])}" if run.get("file") else "")
            + (f"; {builds}" if builds else "")
        )
    return lines


# ------------------------------------------------------------------------------------------- junit


def render_junit(report: Report) -> str:
    """One test case per gate per target (and per regression), for CI test-report viewers. A gate
    judged on an interval names it (and the flips) in its message, which passing cases carry as
    ``system-out``."""
    cases = []
    for t in report.targets:
        for g in t.gates or []:
            message = f"{g['description']}: value {g['value']}, limit {g['limit']}"
            if g.get("detail"):
                message += f"; {g['detail']}"
            cases.append((t.target, g["name"], g["passed"], message))
    for r in report.regressions or []:
        message = f"{r['old']} -> {r['new']} (allowed {r['allowed']})"
        if r.get("rule"):
            message += f"; {r['rule']}"
        cases.append((r["target"], f"regression.{r['metric']}", False, message))
    suite = ET.Element(
        "testsuite", name="edgeft.gates", tests=str(len(cases)), failures=str(sum(not c[2] for c in cases))
    )
    for target, name, ok, message in cases:
        case = ET.SubElement(suite, "testcase", classname=f"edgeft.{target}", name=name)
        if not ok:
            ET.SubElement(case, "failure", message=message).text = message
        else:
            ET.SubElement(case, "system-out").text = message
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True) + "\n"


# -------------------------------------------------------------------------------------------- plot


def write_plot(report: Report, path: Path) -> bool:
    """Size vs mean KLD per artifact, labelled with decode speed. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in report.targets:
        size, kld = t.artifact["size_bytes"] / 1e6, max(t.fidelity["kl_divergence_mean"], 1e-7)
        ax.scatter(size, kld, s=60)
        ax.annotate(
            f"{t.target}\n{t.latency['decode_tok_s']:.0f} tok/s",
            (size, kld),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.set_xlabel("artifact size (MB)")
    ax.set_ylabel(f"mean KL divergence vs {dtype_short(report.reference.get('dtype'))} reference")
    ax.set_yscale("log")
    ax.set_title(f"size vs fidelity ({report.targets[0].latency['threads']} threads, decode median)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def write_reports(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write report.json, report.md, junit.xml, report.png and (builds) loss.png; append the markdown to
    $GITHUB_STEP_SUMMARY when that is set."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "junit": out_dir / "junit.xml"}
    if report.training:
        (out_dir / LOSS_PLOT).unlink(missing_ok=True)  # never a stale curve beside a new report
        if write_loss_plot(report.training, out_dir / LOSS_PLOT):
            paths["loss_plot"] = out_dir / LOSS_PLOT
    md = render_markdown(report, loss_plot="loss_plot" in paths)
    write_atomic(paths["json"], json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
    write_atomic(paths["md"], md)
    write_atomic(paths["junit"], render_junit(report))
    if write_plot(report, out_dir / "report.png"):
        paths["plot"] = out_dir / "report.png"
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as fh:
            fh.write(md)
    return paths


def refold(build_dir: Path) -> bool:
    """Rewrite the build's report (json, md, junit, plot) with its stored device runs; False when the
    build has no report yet (the next `edgeft build` will include them)."""
    path = Path(build_dir) / "report.json"
    if not path.is_file():
        return False
    try:
        report = json.loads(path.read_text())
    except RecursionError:
        raise ConfigError(f"{path}: unreadable report (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable report ({e})") from None
    if not isinstance(report, dict):
        raise ConfigError(f"{path}: not an edgeft report (not a JSON object); run `edgeft build` again")
    typed = Report.from_json(report)
    typed.device_runs = device_runs.load_all(build_dir)
    write_reports(typed, Path(build_dir))
    return True
