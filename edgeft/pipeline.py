"""`edgeft build`: the stage graph from a config and a target, with caching and gates.

    model ─ train ─ merge ─ export (f32) ─ quantize ─ bench ─ report

Each stage writes ``OUT/<stage dir>/`` with a manifest whose key hashes its inputs and parameters;
a stage whose key is unchanged is skipped, so a second build with nothing changed does no work and a
changed parameter re-runs only the stages downstream of it. The final report lands in ``OUT/``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .bench.run import Progress, _no_progress, bench, judge
from .config import BuildConfig
from .errors import ConfigError
from .report import write_reports
from .stage import StageOutput
from .targets import Target

StageCallback = Callable[[str, str], None]  # (stage, "start" | "done" | "cached")


@dataclass
class BuildResult:
    report: dict[str, Any]
    out_dir: Path
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.report.get("passed"))


class _Stages:
    """Runs stages in order, timing each and telling the caller what happens."""

    def __init__(self, on_stage: StageCallback | None):
        self.on_stage = on_stage or (lambda stage, status: None)
        self.log: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.on_stage(name, "start")
        start = time.perf_counter()
        out = fn()
        hit = isinstance(out, StageOutput) and out.cached
        self.log.append({"stage": name, "seconds": round(time.perf_counter() - start, 2), "cached": hit})
        self.on_stage(name, "cached" if hit else "done")
        return out


def check_inputs(cfg: BuildConfig) -> None:
    """Fail before any work when the config cannot produce a build."""
    from .data import load_jsonl
    from .models import BUILTIN_MODELS, resolve_model

    if cfg.model not in BUILTIN_MODELS:
        resolve_model(cfg.model)  # a local folder: validated now, cheaply (built-ins materialise later)

    if cfg.data.train is None:
        raise ConfigError(f"{cfg.source or 'config'}: [data].train: a training dataset is required")
    if cfg.data.eval is None:
        raise ConfigError(f"{cfg.source or 'config'}: [data].eval: a held-out dataset is required for bench")
    load_jsonl(cfg.data.train)
    load_jsonl(cfg.data.eval, need_answers=True)


def build(
    cfg: BuildConfig,
    target: Target,
    out_dir: Path,
    *,
    on_stage: StageCallback | None = None,
    progress: Progress = _no_progress,
) -> BuildResult:
    from .export.gguf import export
    from .merge import merge
    from .models import resolve_model
    from .quantize.gguf import quantize
    from .quantize.gguf_types import UNQUANTIZED
    from .train import train

    check_inputs(cfg)
    out_dir = Path(out_dir)
    stages = _Stages(on_stage)

    base_dir = stages.run("model", lambda: resolve_model(cfg.model))
    adapter = stages.run("train", lambda: train(base_dir, cfg.data.train, out_dir / "adapter", cfg.train))
    merged = stages.run("merge", lambda: merge(base_dir, adapter.path, out_dir / "merged"))
    if target.needs_quantize:
        exported = stages.run("export", lambda: export(merged.path, out_dir / "gguf-f32", "f32"))
        artifact = stages.run(
            "quantize", lambda: quantize(exported.path, out_dir / target.name, target.quant, cfg.bench.threads)
        )
        tensor_types = artifact.manifest["results"]["tensor_types"]
    else:
        outtype = UNQUANTIZED[target.quant]
        artifact = stages.run("export", lambda: export(merged.path, out_dir / target.name, outtype))
        tensor_types = None
    artifact_file = artifact.path / "model.gguf"
    measured = stages.run(
        "bench",
        lambda: bench(
            target=target.name, quant=target.quant, artifact=artifact_file, reference_dir=merged.path,
            base_dir=base_dir, eval_file=cfg.data.eval, out_dir=out_dir / f"bench-{target.name}",
            cfg=cfg.bench, tensor_types=tensor_types, progress=progress,
        ),
    )
    report = judge(dict(measured.manifest["results"]["report"]), cfg.gates)
    if tensor_types is None:
        from .quantize.gguf import tensor_type_counts

        report["artifact"]["tensor_types"] = tensor_type_counts(artifact_file)
    report["stages"] = stages.log
    write_reports(report, out_dir)
    return BuildResult(report, out_dir, stages.log)
