"""`edgeft build` and `edgeft bench`: the stage graph, caching, the report and its gates.

    model ─ train ─ merge ─┬─ reference (torch: stored top-k log-probs, answers, speed)
                           ├─ export f32 ─┬─ quantize (per target) ─ bench (per target, no torch)
                           │              └─ bench (the f32 export: conversion loss alone)
    base model ────────────┼─ bench-base (how far fine-tuning moved the model)
    base + adapter (QLoRA) ┴─ bench-adapter-nf4 (the adapter on its NF4 base: the model as trained)

Each stage writes ``OUT/<stage dir>/`` with a manifest whose key hashes its inputs and parameters;
an unchanged key is a cache hit, so a second build with nothing changed does no work and a changed
parameter re-runs only the stages downstream of it. Reports land in ``OUT/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import build_layout as layout
from .bench import device_runs
from .bench import reference as stored_reference
from .bench.bandwidth import measure_read_bandwidth
from .bench.device_runs import load_all as load_device_runs
from .bench.gates import evaluate_gates, regressions
from .bench.probe import RUN_ID
from .bench.run import (
    Progress,
    _no_progress,
    bench,
    bench_adapter_nf4,
    bench_base,
    reference,
    reference_row,
    retime_reference,
)
from .calibration import build_set
from .config import DTYPE_SHORT, BenchConfig, BuildConfig, GatesConfig
from .data import load_jsonl
from .devices import device_projection
from .errors import ConfigError
from .formats import FORMATS, detect_artifact, get_format
from .loading import loading, read_json
from .machine import describe, same_machine, summary
from .merge import merge
from .models import model_stage, resolve_model
from .preflight import check_build, check_reference
from .remote import remote_bench
from .report import (
    BenchResult,
    Report,
    TargetEntry,
    assemble,
    fine_tune_lost,
    ladder_row,
    paired_task,
    refold,
    target_entry,
    write_reports,
)
from .resources import PeakRSS, ReferenceDtype, machine_reference_dtype
from .stage import StageOutput, check_output_dir, output_dir, read_manifest
from .targets import Target, parse_target_list
from .train import train
from .training_report import training_summary

StageCallback = Callable[[str, str], None]  # (stage, "start" | "done" | "cached")
_DEVICE_REFERENCE = "the device needs a stored reference (a build's reference/ folder), which measures without torch"
NF4_ROW = "adapter on NF4 base"  # QLoRA builds' ladder row (its stage folder: build_layout.BENCH_NF4)
Measured = list[tuple[str, str, BenchResult]]  # (target, quant, its bench results) per target


@dataclass
class BuildResult:
    report: Report
    out_dir: Path
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.report.passed)


class _Stages:
    """Runs stages in order, timing each and telling the caller what happens."""

    def __init__(self, on_stage: StageCallback | None, estimates: dict[str, int] | None = None):
        self.on_stage = on_stage or (lambda stage, status: None)
        self.log: list[dict[str, Any]] = []
        self._done: dict[str, Any] = {}
        self.estimates = estimates or {}  # stage → estimated peak RAM (the resource plan's)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run stage ``name`` once per build: formats ask for shared stages (the export) per target."""
        if name in self._done:
            return self._done[name]

        self.on_stage(name, "start")
        rss = PeakRSS()
        rss.start()
        start = time.perf_counter()
        try:
            out = fn()
        finally:
            peak = rss.stop()
        hit = isinstance(out, StageOutput) and out.cached
        entry = {"stage": name, "seconds": round(time.perf_counter() - start, 2), "cached": hit}
        # this process's own peak during the stage; runtimes benched in subprocesses report theirs apart
        entry["peak_rss_bytes"] = None if hit else peak
        entry["peak_anon_bytes"] = None if hit else rss.peak_anon_bytes
        entry["start_rss_bytes"] = None if hit else rss.start_bytes
        if name in self.estimates:
            entry["estimated_peak_ram_bytes"] = self.estimates[name]
        self.log.append(entry)
        self.on_stage(name, "cached" if hit else "done")
        self._done[name] = out
        return out


def build(
    cfg: BuildConfig,
    targets: list[Target],
    out_dir: Path,
    *,
    on_stage: StageCallback | None = None,
    progress: Progress = _no_progress,
    compare_to: Path | None = None,
    device: Any = None,
    context: int = 2048,
) -> BuildResult:
    """The whole chain for ``targets`` into ``out_dir``, every stage cached; the judged report.

    ``device`` (a :class:`edgeft.devices.DeviceProfile`) adds its projected fit and decode speed."""
    out_dir = Path(out_dir)
    resources = check_build(cfg, targets, out_dir)  # every input and the RAM/disk plan, before any work
    old = _read_old_report(compare_to)
    estimates = {s.stage: s.peak_ram for s in resources.stages}
    with output_dir(out_dir, "build", {"targets": [t.name for t in targets], "config": str(cfg.source or "")}):
        return _build_stages(
            cfg,
            targets,
            out_dir,
            _Stages(on_stage, estimates),
            progress,
            old,
            device,
            context,
            resources.reference_dtype,
        )


def _build_stages(
    cfg: BuildConfig,
    targets: list[Target],
    out_dir: Path,
    stages: _Stages,
    progress: Progress,
    old: Report | None,
    device: Any,
    context: int,
    ref_dtype: ReferenceDtype,
) -> BuildResult:
    """``ref_dtype``: what the plan chose for the torch passes (the reference, bench-base)."""
    bcfg = cfg.bench
    base_dir = stages.run("model", lambda: model_stage(cfg.model)).path
    adapter = stages.run(
        "train",
        lambda: train(
            base_dir, cfg.data.train, out_dir / layout.ADAPTER, cfg.train, validation_file=cfg.data.validation
        ),
    )
    merged = stages.run(
        "merge", lambda: merge(base_dir, adapter.path, out_dir / layout.MERGED, cfg.merge.strategy, cfg.data.eval)
    )
    ref = stages.run(
        "reference",
        lambda: reference(merged.path, cfg.data.eval, out_dir / layout.REFERENCE, bcfg, progress, ref_dtype),
    ).path
    inputs = ReportInputs(bcfg, cfg.gates, out_dir, stages.log, old, device, context)
    inputs.merge, inputs.training = merged.manifest.get("results"), adapter.manifest.get("results")
    inputs.base_results = BenchResult.from_json(
        stages.run(
            "bench-base",
            lambda: bench_base(base_dir, ref, layout.bench_dir(out_dir, "base"), bcfg, progress, ref_dtype),
        ).manifest["results"]
    )
    if cfg.train.method == "qlora":  # the model as trained: what the merge is measured against
        inputs.nf4_results = BenchResult.from_json(
            stages.run(
                "bench adapter-nf4",
                lambda: bench_adapter_nf4(base_dir, adapter.path, ref, out_dir / layout.BENCH_NF4, bcfg, progress),
            ).manifest["results"]
        )

    # Each target's artifact through its format's cached stages (export, quantize, ...).
    calibration = _calibration_sets(cfg, merged.path)
    artifacts = [
        (t, get_format(t.format).build(t, merged.path, out_dir, stages.run, bcfg.threads, calibration, progress))
        for t in targets
    ]
    if bcfg.ladder_export:
        inputs.conversions = _bench_conversions(targets, merged.path, ref, out_dir, stages, bcfg, progress)
    measured = [(t.name, t.quant, _bench_one(stages, t.name, p, ref, out_dir, bcfg, progress)) for t, p in artifacts]
    report = finish_report(measured, ref, inputs)
    return BuildResult(report, out_dir, stages.log)


def _bench_one(
    stages: _Stages, name: str, artifact: Path, ref_dir: Path, out_dir: Path, bcfg: BenchConfig, progress: Progress
) -> BenchResult:
    """Stage ``bench <name>``: the artifact against the stored reference, into ``bench-<name>``."""
    return BenchResult.from_json(
        stages.run(
            f"bench {name}", lambda: bench(artifact, ref_dir, layout.bench_dir(out_dir, name), bcfg, progress)
        ).manifest["results"]
    )


def _bench_conversions(
    targets: list[Target],
    merged_dir: Path,
    ref_dir: Path,
    out_dir: Path,
    stages: _Stages,
    bcfg: BenchConfig,
    progress: Progress,
) -> list[tuple[str, BenchResult]]:
    """The unquantized export of every format in use, benched: its ladder row separates conversion
    loss from quantization loss."""
    rows = []
    for fmt in dict.fromkeys(get_format(t.format) for t in targets):
        label, path = fmt.conversion(merged_dir, out_dir, stages.run)
        rows.append((label, _bench_one(stages, label, path, ref_dir, out_dir, bcfg, progress)))
    return rows


def _calibration_sets(cfg: BuildConfig, merged_dir: Path) -> Callable[[str], Any]:
    """``source`` → its calibration set for this build, tokenised with the merged model's tokenizer
    once per source (only targets with an ``imatrix`` or ``max_size_mb`` ask); ``purpose``
    "sensitivity" takes ``[calibration].sensitivity_tokens`` of it, spread over the set."""
    made: dict[str, Any] = {}

    def get(source: str, purpose: str = "imatrix") -> Any:
        if source not in made:
            from transformers import AutoTokenizer

            with loading(merged_dir, "the merged model's tokenizer"):
                tokenizer = AutoTokenizer.from_pretrained(merged_dir)
            c = cfg.calibration
            made[source] = build_set(
                source, tokenizer, cfg.data.train, tokens=c.tokens, chunk_tokens=c.chunk_tokens, task_share=c.task_share
            )
        if purpose == "sensitivity":
            return made[source].spread(cfg.calibration.sensitivity_tokens)
        return made[source]

    return get


def _read_old_report(path: Path | None) -> Report | None:
    if path is None:
        return None

    try:
        old = read_json(path)
    except FileNotFoundError:
        raise ConfigError(f"--compare-to {path}: report not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--compare-to {path}: not a readable report.json ({e})") from None
    if not isinstance(old, dict) or not (isinstance(old.get("targets"), list) or "target" in old):
        raise ConfigError(f"--compare-to {path}: not an edgeft report.json (no 'targets' list)")
    return Report.from_json(old)


@dataclass
class ReportInputs:
    """Everything a report is judged and assembled from besides the targets' bench results: what
    `build` and `bench` each collect and hand to :func:`finish_report`."""

    bcfg: BenchConfig
    gates: GatesConfig
    out_dir: Path
    stages: list[dict[str, Any]] = field(default_factory=list)
    old_report: Report | None = None  # --compare-to
    device: Any = None  # a devices.DeviceProfile: its projected fit and decode speed
    context: int = 2048
    # ladder rows besides the reference: bench-base, bench-adapter-nf4 (QLoRA) and each format's
    # unquantized export as (label, bench results)
    base_results: BenchResult | None = None
    nf4_results: BenchResult | None = None
    conversions: list[tuple[str, BenchResult]] = field(default_factory=list)
    merge: dict[str, Any] | None = None  # the merge stage's results: strategy, and for `auto` both KLDs
    training: dict[str, Any] | None = None  # the train stage's results


@dataclass
class _Measurements:
    """What the report measures itself, once per report, on top of the bench stages' results."""

    ref_meta: dict[str, Any]  # the stored reference's, re-timed in this run where its timing is older
    timing_notes: list[str]
    bandwidth_gb_s: float  # one read-bandwidth figure, so every roofline shares a ceiling


def finish_report(measured: Measured, ref_dir: Path, inputs: ReportInputs) -> Report:
    """Targets' measurements + stored reference → judged report, written to ``inputs.out_dir``."""
    found = _measure(measured, ref_dir, inputs.bcfg)
    base_acc = inputs.base_results.fidelity["task_accuracy_artifact"] if inputs.base_results else None
    entries = [
        target_entry(name, quant, results, found.ref_meta, base_acc, inputs.bcfg.golden, found.bandwidth_gb_s)
        for name, quant, results in measured
    ]
    _judge_targets(entries, inputs.gates)
    ladder = _ladder(entries, ref_dir, found.ref_meta, inputs)
    report = assemble(entries, ref_dir, found.ref_meta, ladder, this_machine(measured, found.ref_meta))
    report.run_id = RUN_ID
    report.warnings = list(found.timing_notes)
    report.warnings += fine_tune_lost(entries, inputs.base_results.fidelity if inputs.base_results else None)
    _judge_report(report, inputs.old_report)
    if inputs.device is not None:
        as_json = [(name, quant, r.to_json()) for name, quant, r in measured]
        report.device = device_projection(inputs.device, as_json, inputs.context)
    report.device_runs = load_device_runs(inputs.out_dir)  # kept across rebuilds: see bench/device_runs.py
    report.stages = inputs.stages
    report.merge = inputs.merge or None
    if inputs.training:
        report.training = training_summary(inputs.training)  # loss histories and the kept step
    write_reports(report, inputs.out_dir)
    return report


def _measure(measured: Measured, ref_dir: Path, bcfg: BenchConfig) -> _Measurements:
    ref_meta, timing_notes = _same_run_reference(stored_reference.load(ref_dir).meta, measured, bcfg)
    threads = measured[0][2].performance["latency"]["threads"]
    return _Measurements(ref_meta, timing_notes, measure_read_bandwidth(threads)["read_gb_s"])


def _judge_targets(entries: list[TargetEntry], gates: GatesConfig) -> None:
    for entry in entries:
        entry.gates = evaluate_gates(entry.to_json(), gates)
        entry.passed = all(g["passed"] for g in entry.gates)


def _judge_report(report: Report, old: Report | None) -> None:
    """The regressions against ``--compare-to``'s report, and the verdict."""
    warnings = report.warnings = list(report.warnings or [])
    if old is not None:
        same = same_machine(report.machine, old.machine)
        if not same:
            warnings.append(
                "--compare-to: the old report was measured on another machine "
                f"({summary(old.machine or {})}); speed and memory are not compared, only fidelity"
            )
        notes: list[str] = []
        report.regressions = regressions(report.to_json(), old.to_json(), compare_speed=same, notes=notes)
        warnings += notes
    report.passed = all(e.passed for e in report.targets or []) and not report.regressions


def _ladder(
    entries: list[TargetEntry], ref_dir: Path, ref_meta: dict[str, Any], inputs: ReportInputs
) -> list[dict[str, Any]]:
    """The fidelity ladder: base → (adapter on NF4) → reference → each unquantized export → targets."""

    def paired(results: BenchResult) -> dict[str, Any]:
        """A ladder row's fidelity with its answers paired against the reference's."""
        return dict(results.fidelity, task_accuracy_paired=paired_task(ref_meta, results.answers or []))

    def torch_type(dtype: str | None) -> str:
        """A torch row's type column: the dtype it ran in (stages cached before it was recorded: fp32)."""
        return DTYPE_SHORT.get(dtype or "float32", "fp32")

    ladder = []
    if inputs.base_results:
        ladder.append(
            ladder_row("base", "torch", paired(inputs.base_results), None, torch_type(inputs.base_results.dtype))
        )
    if inputs.nf4_results:
        ladder.append(ladder_row(NF4_ROW, "torch", paired(inputs.nf4_results), None, "nf4"))
    ladder.append(
        ladder_row(
            "reference",
            "torch",
            reference_row(ref_dir),
            ref_meta["model_size_bytes"],
            torch_type(ref_meta.get("dtype")),
        )
    )
    for label, results in inputs.conversions:
        art = results.artifact
        ladder.append(
            ladder_row(f"{label} export", art["runtime"], paired(results), art["size_bytes"], art["file_type"])
        )
    for e in entries:
        art = e.artifact
        ladder.append(ladder_row(e.target, art["runtime"], e.fidelity, art["size_bytes"], art["quant"]))
    return ladder


def _bench_remote(
    remote: Any,
    cfg: BuildConfig,
    reference_dir: Path,
    chosen: list[tuple[str, Path]],
    out_dir: Path,
    build_dir: Path | None,
    *,
    device_file: Path | None,
    context: int,
) -> Report:
    with output_dir(out_dir, "bench", {"artifacts": [str(p) for _, p in chosen], "remote": remote.host}):
        report = remote_bench(
            remote,
            cfg,
            reference_dir,
            chosen,
            out_dir,
            run_id=RUN_ID,
            device_file=device_file,
            context=context if device_file is not None else None,
        )
        write_reports(report, out_dir)
    if build_dir is not None:
        record = device_runs.from_report(report.to_json(), f"edgeft bench --remote {remote.host}", device_runs.now())
        device_runs.save(build_dir, f"remote-{remote.host}", record)
        refold(build_dir)
    return report


def _same_run_reference(
    ref_meta: dict[str, Any], measured: Measured, bcfg: BenchConfig
) -> tuple[dict[str, Any], list[str]]:
    """Speed ratios only mean something between timings of one run: when an artifact was timed now
    and the (cached) reference earlier, time the reference again now. Where that cannot be done,
    say so; the report marks every row timed in another run."""
    timed_now = [name for name, _, r in measured if r.performance.get("run_id") == RUN_ID]
    if not timed_now or ref_meta["performance"].get("run_id") == RUN_ID:
        return ref_meta, []
    fresh = retime_reference(ref_meta, bcfg)
    if fresh is None:
        when = ref_meta["performance"].get("timed_at", "an earlier run")
        short = DTYPE_SHORT.get(ref_meta.get("dtype", "float32"), "fp32")
        return ref_meta, [
            f"the {short} reference was timed in another run ({when}) and its model is not here to time again: "
            f"the × {short} column compares timings from two runs"
        ]
    return {**ref_meta, "performance": fresh}, []


def this_machine(measured: Measured, ref_meta: dict[str, Any]) -> dict[str, Any]:
    """This machine, with each runtime's build (llama.cpp's instruction sets, torch's kernels)."""
    builds = {}
    for perf in [ref_meta["performance"], *(r.performance for _, _, r in measured)]:
        lat = perf["latency"]
        if lat.get("runtime_build"):
            builds[
                lat["runtime_version"] if lat["runtime"] == "torch" else f"{lat['runtime']} {lat['runtime_version']}"
            ] = lat["runtime_build"]
    return {**describe(), "runtime_builds": builds}


def _reference_dtype(cfg: BuildConfig, reference_dir: Path, stored: bool, dtype: str) -> None:
    """``--reference-dtype`` chooses how the reference stage computes; a stored reference was computed
    already, so the flag would change nothing there: say so rather than ignore it."""
    if stored:
        meta = json.loads((reference_dir / stored_reference.META).read_text())
        raise ConfigError(
            f"--reference-dtype {dtype}: the reference in {reference_dir} is stored already (computed in "
            f"{meta.get('dtype', 'float32')}); the flag applies when --reference is the fine-tuned model's folder"
        )
    cfg.bench.reference_dtype = dtype


def bench_artifacts(
    cfg: BuildConfig,
    out_dir: Path,
    *,
    build_dir: Path | None = None,
    target_spec: str | None = None,
    artifacts: list[Path] | None = None,
    reference_dir: Path | None = None,
    eval_file: Path | None = None,
    compare_to: Path | None = None,
    progress: Progress = _no_progress,
    device: Any = None,
    context: int = 2048,
    remote: Any = None,
    device_file: Path | None = None,
    reference_dtype: str | None = None,
) -> Report:
    """`edgeft bench`: artifacts of a build (``build_dir`` + targets) or given files, one report.

    With a stored reference folder nothing here imports torch; with an fp32 HF folder as
    reference, the reference stage runs first (torch) and is stored under ``out_dir/reference``.
    With ``remote`` (an :class:`edgeft.remote.Remote`) the measuring happens on that device over
    SSH; its report lands in ``out_dir`` and, for a build, is stored as one of the build's device runs.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    old = _read_old_report(compare_to)
    stages = _Stages(None)
    inputs = ReportInputs(cfg.bench, cfg.gates, out_dir, stages.log, old, device, context)
    chosen: list[tuple[str, Path]] = []
    if build_dir is not None:
        build_dir = Path(build_dir)
        chosen = _build_targets_to_bench(build_dir, target_spec)
        reference_dir = reference_dir or build_dir / layout.REFERENCE
        _read_build_ladder(build_dir, inputs)
    chosen += [_given_artifact(Path(a)) for a in artifacts or []]
    _check_chosen(chosen)
    if reference_dir is None:
        raise ConfigError("--reference: a stored reference folder or the fine-tuned fp32 HF folder is required")
    stored = check_reference(reference_dir)
    if reference_dtype:
        _reference_dtype(cfg, Path(reference_dir), stored, reference_dtype)
    if remote is not None:
        if not stored:
            raise ConfigError(f"--remote: --reference {reference_dir} is a Hugging Face folder; {_DEVICE_REFERENCE}")
        return _bench_remote(
            remote, cfg, Path(reference_dir), chosen, out_dir, build_dir, device_file=device_file, context=context
        )
    hf_reference = None if stored else _hf_reference(cfg, Path(reference_dir), eval_file)
    with output_dir(out_dir, "bench", {"artifacts": [str(p) for _, p in chosen]}):
        if hf_reference is not None:
            eval_path, ref_dtype = hf_reference
            hf = resolve_model(str(reference_dir))
            reference_dir = stages.run(
                "reference",
                lambda: reference(hf, eval_path, out_dir / layout.REFERENCE, cfg.bench, progress, ref_dtype),
            ).path
        measured: Measured = []
        for name, path in chosen:
            results = _bench_one(stages, name, path, Path(reference_dir), out_dir, cfg.bench, progress)
            measured.append((name, results.artifact["file_type"], results))
        return finish_report(measured, Path(reference_dir), inputs)


def _build_targets_to_bench(build_dir: Path, target_spec: str | None) -> list[tuple[str, Path]]:
    """(name, artifact) of a build's targets: those ``target_spec`` names, else every one it holds."""
    if not build_dir.is_dir():
        raise ConfigError(f"--build {build_dir}: no such build folder")
    names = [t.name for t in parse_target_list(target_spec)] if target_spec else layout.built_targets(build_dir)
    chosen = []
    for name in names:
        if not (build_dir / name).is_dir():
            raise ConfigError(
                f"--target {name}: {build_dir / name} not found; run `edgeft build --target {name} --out {build_dir}` first"
            )
        chosen.append((name, detect_artifact(build_dir / name, f"--target {name}:")[1]))
    return chosen


def _read_build_ladder(build_dir: Path, inputs: ReportInputs) -> None:
    """The build's own ladder rows (bench-base, adapter-nf4, the conversions), as its bench stages stored them."""

    def results(folder: Path) -> BenchResult | None:
        found = (read_manifest(folder) or {}).get("results")
        return BenchResult.from_json(found) if found else None

    inputs.base_results = results(layout.bench_dir(build_dir, "base"))
    inputs.nf4_results = results(build_dir / layout.BENCH_NF4)
    for f in (get_format(name) for name in FORMATS):
        if conversion := results(layout.bench_dir(build_dir, f.CONVERSION)):
            inputs.conversions.append((f.CONVERSION, conversion))


def _given_artifact(path: Path) -> tuple[str, Path]:
    """(its row's name, the artifact) for an --artifact path: a folder's name, a file's stem."""
    artifact = detect_artifact(path)[1]
    return (path.name if path.is_dir() else artifact.stem), artifact


def _check_chosen(chosen: list[tuple[str, Path]]) -> None:
    if not chosen:
        raise ConfigError("nothing to bench: give --build DIR (with --target) or --artifact FILE")
    names = [n for n, _ in chosen]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"--artifact: two artifacts are both named {dup!r}; rename one (reports key rows by name)")


def _hf_reference(cfg: BuildConfig, reference_dir: Path, eval_file: Path | None) -> tuple[Path, ReferenceDtype]:
    """An fp32 HF folder given as the reference is measured first (torch), on held-out data: (the
    eval file, the dtype the plan picks for it), checked before any work."""
    eval_path = eval_file or cfg.data.eval
    if eval_path is None:
        raise ConfigError("--eval: an HF --reference needs held-out data (or [data].eval in --config)")
    load_jsonl(eval_path, need_answers=True)
    ref_dtype = machine_reference_dtype(reference_dir, cfg.bench.reference_dtype)
    return eval_path, ref_dtype
