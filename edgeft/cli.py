"""The `edgeft` command: thin Click commands over the library; each calls one library function.

User mistakes (:class:`edgeft.errors.EdgeftError`) print one line and exit 2 (a failed gate: 1);
set EDGEFT_RAISE_ERRORS=1 to see the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from . import __version__
from .errors import EdgeftError


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except EdgeftError as e:
        if os.environ.get("EDGEFT_RAISE_ERRORS"):
            raise
        click.echo(f"edgeft: error: {e}", err=True)
        sys.exit(e.exit_code)


def _quiet_libraries() -> None:
    """Keep third-party chatter (hub hints, kernel notices) off the terminal."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: no code may fetch from a hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns on import that an optional hub-fetched CPU kernel is missing; we never fetch.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _load_cfg(config: Path | None, model: str | None):
    from .config import load_config

    cfg = load_config(config)
    if model:
        cfg.model = model
    return cfg


@click.group()
@click.version_option(__version__, prog_name="edgeft")
def cli() -> None:
    """Fine-tune, merge, quantize and measure language models for edge devices."""
    _quiet_libraries()


@cli.command()
@click.option("--target", "target_name", default="gguf-q4", show_default=True, help="build target (see `edgeft targets`)")
@click.option("--config", type=click.Path(path_type=Path), help="edgeft.toml build config")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out/build"), show_default=True)
@click.option("--model", help="override the config's model (builtin name or local HF folder)")
@click.option("--dry-run", is_flag=True, help="print the resolved config and target, do nothing")
def build(target_name: str, config: Path | None, out_dir: Path, model: str | None, dry_run: bool) -> None:
    """Train → merge → export → quantize → bench, each stage cached; exit 1 when a gate fails."""
    with _user_errors():
        from .config import config_as_dict
        from .pipeline import build as run_build
        from .targets import get_target

        cfg = _load_cfg(config, model)
        target = get_target(target_name)
        if dry_run:
            click.echo(json.dumps({"target": target.__dict__, "out": str(out_dir), "config": config_as_dict(cfg)}, indent=2))
            return
        from .progress import stage_printer, rich_progress

        with rich_progress() as progress:
            result = run_build(cfg, target, out_dir, on_stage=stage_printer(), progress=progress)
        _print_summary(result.report, out_dir)
        failed = [g for g in result.report["gates"] if not g["passed"]]
        if failed:
            names = ", ".join(f"{g['name']} (limit {g['limit']:.4g}, got {g['value']})" for g in failed)
            click.echo(f"edgeft: gate failed: {names}", err=True)
            sys.exit(1)


def _print_summary(report: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    f, lat, art = report["fidelity"], report["latency"], report["artifact"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    table = Table(title=f"{report['target']} ({art['quant']}) — {'PASSED' if report['passed'] else 'FAILED'}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("size", f"{art['size_bytes'] / 1e6:.1f} MB (fp32 {report['reference']['size_bytes'] / 1e6:.0f} MB)"),
        ("task accuracy base / fine-tuned / artifact",
         f"{pct(f['task_accuracy_base'])} / {pct(f['task_accuracy_reference'])} / {pct(f['task_accuracy_artifact'])}"),
        ("mean KLD vs fine-tuned fp32", f"{f['kl_divergence_mean']:.4f}"),
        ("top-1 agreement", pct(f["top1_agreement"])),
        ("perplexity ref → artifact", f"{f['perplexity_reference']:.3f} → {f['perplexity_artifact']:.3f} ({f['perplexity_delta_pct']:+.1f}%)"),
        (f"decode tok/s artifact vs fp32 torch ({lat['threads']} threads)",
         f"{lat['decode_tok_s']:.1f} vs {lat['reference_decode_tok_s']:.1f} ({lat['speedup']:.1f}×)"),
    ]
    for row in rows:
        table.add_row(*row)
    Console(stderr=False).print(table)
    click.echo(f"report: {out_dir / 'report.md'}")


@cli.command()
@click.option("--config", type=click.Path(path_type=Path), help="edgeft.toml build config ([train] and [data])")
@click.option("--model", help="builtin name or local HF folder (default: the config's)")
@click.option("--data", "train_file", type=click.Path(path_type=Path), help="chat JSONL (default: the config's [data].train)")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="adapter folder to write")
def train(config: Path | None, model: str | None, train_file: Path | None, out_dir: Path) -> None:
    """Train a LoRA/QLoRA adapter; writes a standard peft adapter folder + manifest."""
    with _user_errors():
        from .data import load_jsonl
        from .errors import ConfigError
        from .models import resolve_model
        from .train import train as run_train

        cfg = _load_cfg(config, model)
        data = train_file or cfg.data.train
        if data is None:
            raise ConfigError("--data: a training JSONL is required (or [data].train in --config)")
        load_jsonl(data)  # fail on bad data before materialising a model
        out = run_train(resolve_model(cfg.model), data, out_dir, cfg.train)
        click.echo(f"adapter: {out.path}{' (cached)' if out.cached else ''}")


@cli.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="base: builtin name or local HF folder")
@click.option("--adapter", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
def merge(model: str, adapter: Path, out_dir: Path) -> None:
    """Merge a LoRA adapter into its fp32 base; writes a safetensors Hugging Face folder."""
    with _user_errors():
        from .merge import merge as run_merge
        from .models import resolve_model

        out = run_merge(resolve_model(model), adapter, out_dir)
        click.echo(f"merged model: {out.path}{' (cached)' if out.cached else ''}")


@cli.command()
@click.option("--model", required=True, help="builtin name or local HF folder")
@click.option("--target", "target_name", default="gguf-f32", show_default=True, help="gguf-f32 or gguf-f16")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
def export(model: str, target_name: str, out_dir: Path) -> None:
    """Convert a Hugging Face llama-family model to an unquantized GGUF (OUT/model.gguf)."""
    with _user_errors():
        from .errors import ConfigError
        from .export.gguf import export as run_export
        from .models import resolve_model
        from .quantize.gguf_types import UNQUANTIZED
        from .targets import get_target

        target = get_target(target_name)
        if target.needs_quantize:
            raise ConfigError(f"--target {target_name}: export writes unquantized GGUF (gguf-f32, gguf-f16); use `edgeft quantize` next")
        out = run_export(resolve_model(model), out_dir, UNQUANTIZED[target.quant])
        click.echo(f"gguf: {out.path / 'model.gguf'}{' (cached)' if out.cached else ''}")


@cli.command()
@click.option("--gguf", "gguf_dir", type=click.Path(path_type=Path), required=True, help="folder from `edgeft export`")
@click.option("--target", "target_name", default="gguf-q4", show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--threads", type=int, default=0, help="quantizer threads (0: all cores)")
def quantize(gguf_dir: Path, target_name: str, out_dir: Path, threads: int) -> None:
    """Quantize an exported GGUF with llama.cpp (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, ...)."""
    with _user_errors():
        from .quantize.gguf import quantize as run_quantize
        from .targets import get_target

        target = get_target(target_name)
        out = run_quantize(gguf_dir, out_dir, target.quant, threads)
        types = ", ".join(f"{k}×{v}" for k, v in out.manifest["results"]["tensor_types"].items())
        click.echo(f"gguf: {out.path / 'model.gguf'} [{types}]{' (cached)' if out.cached else ''}")


@cli.command()
@click.option("--artifact", type=click.Path(path_type=Path), required=True, help="a .gguf file or a folder holding model.gguf")
@click.option("--reference", "reference_dir", type=click.Path(path_type=Path), required=True, help="fp32 HF folder (the merged model)")
@click.option("--base", "base_model", help="base model for base task accuracy (builtin name or HF folder)")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="held-out chat JSONL with answers")
@click.option("--config", type=click.Path(path_type=Path), help="edgeft.toml for [bench], [gates], [data].eval")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out/bench"), show_default=True)
@click.option("--threads", type=int, help="threads for every runtime (default: [bench].threads or all cores)")
def bench(artifact: Path, reference_dir: Path, base_model: str | None, eval_file: Path | None,
          config: Path | None, out_dir: Path, threads: int | None) -> None:
    """Measure an artifact against the fp32 reference; writes report.json and report.md."""
    with _user_errors():
        from .bench.run import bench as run_bench, judge
        from .errors import ConfigError
        from .models import resolve_model
        from .progress import rich_progress
        from .quantize.gguf import describe
        from .report import write_reports

        cfg = _load_cfg(config, None)
        if threads is not None:
            cfg.bench.threads = threads
        eval_path = eval_file or cfg.data.eval
        if eval_path is None:
            raise ConfigError("--eval: a held-out JSONL with answers is required (or [data].eval in --config)")
        gguf = artifact / "model.gguf" if artifact.is_dir() else artifact
        if not gguf.is_file():
            raise ConfigError(f"--artifact {artifact}: no GGUF file there")
        reference = resolve_model(str(reference_dir))
        base = resolve_model(base_model) if base_model else None
        info = describe(gguf)
        with rich_progress() as progress:
            out = run_bench(target=gguf.parent.name, quant="+".join(info["tensor_types"]), artifact=gguf,
                            reference_dir=reference, base_dir=base, eval_file=eval_path, out_dir=out_dir / "measurements",
                            cfg=cfg.bench, tensor_types=info["tensor_types"], progress=progress)
        report = judge(dict(out.manifest["results"]["report"]), cfg.gates)
        write_reports(report, out_dir)
        _print_summary(report, out_dir)
        if not report["passed"]:
            sys.exit(1)


@cli.command()
def targets() -> None:
    """List the build targets."""
    with _user_errors():
        from .targets import available_targets

        for t in available_targets().values():
            click.echo(f"{t.name:12} {t.format:6} {t.quant:8} {t.description}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
