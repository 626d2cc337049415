"""The `edgeft` command: thin Click commands over the library; each calls one library function.

User mistakes (:class:`edgeft.errors.EdgeftError`) print one line and exit 2 (a failed gate: 1).
Any other exception is a bug in edgeft: one ``edgeft: error: internal error (...)`` line and exit 3,
never 1, which CI reads as a failed quality gate. Set EDGEFT_RAISE_ERRORS=1 to see the traceback
instead.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import click
from rich.console import Console
from rich.table import Table

# The CLI is the top layer and a dispatcher: each command imports the library code it runs, so
# `edgeft --help` and a refused input answer in ~0.1 s instead of ~0.5 s (numpy and every stage
# module), which a Raspberry Pi multiplies by five. The library itself imports top-down
# (tests/test_layering.py).
from . import __version__
from .config import REFERENCE_DTYPES, config_as_dict, load_config
from .errors import ConfigError, EdgeftError, InternalError, first_line
from .progress import rich_progress, stage_printer

if TYPE_CHECKING:
    from .report import Report


@contextmanager
def _user_errors() -> Iterator[None]:
    """Every command's body: an error becomes one ``edgeft: error:`` line and its exit status.

    Exception, not BaseException: Ctrl-C and sys.exit keep their meaning. RecursionError and
    MemoryError are Exceptions and end here too; the line is built from the exception alone, so it
    can still be printed once the stack has unwound.
    """
    try:
        yield
    except EdgeftError as e:
        if os.environ.get("EDGEFT_RAISE_ERRORS"):
            raise
        click.echo(f"edgeft: error: {e}", err=True)
        sys.exit(e.exit_code)
    except Exception as e:
        if os.environ.get("EDGEFT_RAISE_ERRORS"):
            raise
        _internal_error(e)


def _internal_error(e: BaseException) -> None:
    """One line for an exception edgeft did not expect, and exit 3."""
    # A failed write to stdout (a full disk, a closed pipe) leaves its bytes buffered; the
    # interpreter would retry at exit, print a second error and exit 120 instead of 3.
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        _drop_stdout()
    click.echo(
        f"edgeft: error: internal error ({type(e).__name__}: {first_line(e, 200)}); this is a bug in edgeft, "
        "rerun with EDGEFT_RAISE_ERRORS=1 for the traceback",
        err=True,
    )
    sys.exit(InternalError.exit_code)  # 3: what the user's input does not explain


def _drop_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (a test runner's buffer)
        pass


def _quiet_libraries() -> None:
    """Keep third-party chatter (hub hints, kernel notices) off the terminal."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: no code may fetch from a hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' per-load "Loading weights" bars; the training progress bar is unaffected.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes warns on import that an optional hub-fetched CPU kernel is missing, and the
    # `kernels` package that would fetch it says it skipped its trust check offline; we never fetch.
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # peft 0.21 calls transformers 5's deprecated `gradient_checkpointing` names whenever it wraps a
    # model (training, QLoRA, loading an adapter): a notice for peft's maintainers, not for the user.
    warnings.filterwarnings("ignore", message=r"`\w*gradient_checkpointing\w*` is deprecated", category=FutureWarning)


def _load_cfg(config: Path | None, model: str | None):
    cfg = load_config(config)
    if model:
        cfg.model = model
    return cfg


def _train_device(cfg, device: str | None, flag: str) -> None:
    """Apply a training-device flag; CUDA asked for without a GPU fails here, naming the flag."""
    from .train import resolve_device

    if device is None:
        return
    cfg.train.device = device
    if device == "cuda":
        try:
            resolve_device("cuda")
        except ConfigError as e:
            raise ConfigError(str(e).replace("[train].device = 'cuda'", f"{flag} cuda")) from None


_DEVICES = click.Choice(["auto", "cpu", "cuda"])
_BASIS = {  # how a projected decode range reads (edgeft.decode_model)
    "fit": "estimate [band] from a fit to runs on the device",
    "prior": "low–high between an assumed per-token cost and bandwidth alone, the low end the estimate",
    "ceiling": "≤ bandwidth alone, an upper bound",
    "none": "no bytes per token known",
}


@click.group()
@click.version_option(__version__, prog_name="edgeft")
def cli() -> None:
    """Fine-tune, merge, quantize and measure language models for edge devices."""
    _quiet_libraries()


_gate_option = click.option(
    "--gate",
    "gate_flags",
    multiple=True,
    metavar="NAME=VALUE",
    help="quality gate on top of [gates], e.g. --gate max_kld=0.1 (repeatable)",
)
_reference_dtype_option = click.option(
    "--reference-dtype",
    type=click.Choice(REFERENCE_DTYPES),
    help="what torch computes the reference in (overrides [bench].reference_dtype; auto: float32 where one fp32 "
    "copy fits this machine's RAM, else bfloat16)",
)
_compare_option = click.option(
    "--compare-to",
    type=click.Path(path_type=Path),
    help="an older report.json: fail on regressions beyond the measured spread",
)


def _device_options(f):
    """--device PROFILE and --context N, the same on `build` and `bench`."""
    f = click.option(
        "--context",
        type=click.IntRange(1, 1 << 20),
        default=2048,
        show_default=True,
        help="with --device: the context length the app will use (KV cache in the RAM fit)",
    )(f)
    return click.option(
        "--device",
        help="a device profile (rpi5, android-mid, ...; `edgeft devices`) or its .toml: bench with its thread "
        "count and add a projected fit and decode speed for it to the report",
    )(f)


@cli.command()
@click.option(
    "--target",
    "target_spec",
    default="gguf-q4",
    show_default=True,
    help="build target(s), comma-separated, e.g. gguf-q8,gguf-q4 (see `edgeft targets`)",
)
@click.option("--config", type=click.Path(path_type=Path), help="edgeft.toml build config")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out/build"), show_default=True)
@click.option("--model", help="override the config's model (builtin name or local HF folder)")
@click.option(
    "--train-device", type=_DEVICES, help="where training runs (overrides [train].device; default auto: a GPU if any)"
)
@_gate_option
@_compare_option
@_device_options
@_reference_dtype_option
@click.option("--dry-run", is_flag=True, help="print the resolved config, targets and RAM/disk plan; do nothing")
def build(
    target_spec: str,
    config: Path | None,
    out_dir: Path,
    model: str | None,
    train_device: str | None,
    gate_flags: tuple[str, ...],
    compare_to: Path | None,
    device: str | None,
    context: int,
    reference_dtype: str | None,
    dry_run: bool,
) -> None:
    """Train → merge → export → quantize → bench, each stage cached; exit 1 when a gate fails."""
    from .bench.gates import parse_gate_flags
    from .devices import get_device
    from .pipeline import build as run_build
    from .resources import check_fits as check_resources_fit
    from .resources import plan as plan_resources
    from .resources import render as render_resources
    from .targets import apply_overrides, available_targets, parse_target_list

    with _user_errors():
        cfg = _load_cfg(config, model)
        _train_device(cfg, train_device, "--train-device")
        if reference_dtype:
            cfg.bench.reference_dtype = reference_dtype
        cfg.gates = parse_gate_flags(gate_flags, cfg.gates)
        for name in cfg.targets:
            if name not in available_targets():
                raise ConfigError(
                    f"{cfg.source}: [targets.{name}]: no such target; valid targets: {', '.join(available_targets())}"
                )
        targets = apply_overrides(parse_target_list(target_spec), cfg.targets, str(cfg.source))
        profile = None
        if device is not None:
            profile = get_device(device)
            cfg.bench.threads = profile.threads
        if dry_run:
            resources = plan_resources(cfg, targets, out_dir)
            shown = {"targets": [t.__dict__ for t in targets], "out": str(out_dir), "config": config_as_dict(cfg)}
            click.echo(json.dumps(shown | {"resources": resources.to_dict()}, indent=2))
            click.echo(render_resources(resources), err=True)
            try:
                check_resources_fit(resources, str(cfg.source or "config"))
            except EdgeftError as e:
                click.echo(f"edgeft: would refuse: {e}", err=True)
            return

        with rich_progress() as progress:
            result = run_build(
                cfg,
                targets,
                out_dir,
                on_stage=stage_printer(),
                progress=progress,
                compare_to=compare_to,
                device=profile,
                context=context,
            )
        _finish(result.report, out_dir)


def _finish(report: Report, out_dir: Path) -> None:
    """Print the summary table; exit 1 naming each failed gate or regression."""
    _print_summary(report, out_dir)
    said: set[str] = set()  # task gates share one piece of evidence: say it once

    def evidence(detail: str | None) -> str:
        if not detail or detail in said:
            return ")"
        said.add(detail)
        return f"; {detail})"

    failed = [
        f"{t.target}: {g['name']} (limit {g['limit']}, got {_value(g['value'])}" + evidence(g.get("detail"))
        for t in report.targets or []
        for g in t.gates or []
        if not g["passed"]
    ]
    failed += [
        f"{r['target']}: regression in {r['metric']} ({r['old']:.4g} -> {r['new']:.4g}"
        + (f"; {r['rule']})" if r.get("rule") else ")")
        for r in report.regressions or []
    ]
    if failed:
        click.echo(f"edgeft: gate failed: {'; '.join(failed)}", err=True)
        sys.exit(1)


def _value(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _task_change(p: dict | None) -> str:
    """Δ task accuracy (points, artifact − reference) with its paired 95% interval."""
    if not p:
        return ""
    lo, hi = p["interval"]
    return f"{100 * p['difference']:+.1f} [{100 * lo:+.1f},{100 * hi:+.1f}]"


def _print_summary(report: Report, out_dir: Path) -> None:
    # markup off: names in the table come from files (targets, llama-bench JSON) and are text, not
    # rich markup ("[/x]" would crash the render, "[link=...]" would make a terminal hyperlink)
    from .machine import summary as machine_summary

    console = Console(markup=False)
    if not console.is_terminal:  # CI logs: do not squeeze the table into 80 columns
        console = Console(width=120, markup=False)
    console.print(_ladder_table(report))

    machine = report.machine or {}
    where = machine_summary(machine) if machine.get("cpu_model") else machine.get("platform", "")
    if report.remote:
        where = f"measured on {report.remote['host']} over SSH: {where}"
    targets = report.targets or []
    click.echo(f"threads: {targets[0].latency['threads']} · {where} · report: {out_dir / 'report.md'}")
    for t in targets:
        sus = t.latency.get("sustained")
        if sus:
            click.echo(
                f"sustained decode, {t.target}: {sus['first']['tok_s']:.1f} tok/s in the first 20% of "
                f"{sus['tokens']} tokens → {sus['last']['tok_s']:.1f} in the last ({sus['change_pct']:+.0f}%, "
                f"{sus['seconds']:.0f} s)"
            )
    for w in report.warnings or []:
        click.echo(f"edgeft: warning: {w}", err=True)
    if report.device:
        _print_device_projection(report.device)


def _ladder_table(report: Report) -> Table:
    from .report import dtype_short

    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731

    ref = report.reference or {}
    ref_type = dtype_short(ref.get("dtype"))
    table = Table(title=f"edgeft — {'PASSED' if report.passed else 'FAILED'} (vs fine-tuned {ref_type} reference)")
    columns = ("stage", "MB", "mean KLD", "top-1", "Δppl", "task acc", "Δ task [95% CI]", "✓→✗ / ✗→✓")
    for col in (*columns, "decode tok/s", "peak RSS MB"):
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=col.startswith("Δ task"))
    speed = {t.target: t for t in report.targets or []}
    ref_perf = ref["performance"]
    for r in report.ladder or []:
        t = speed.get(r["stage"])
        if t:
            tok_s, rss = (
                f"{t.latency['decode_tok_s']:.1f} ({t.latency['speedup']:.1f}×)",
                f"{t.memory['peak_rss_bytes'] / 1e6:.0f}",
            )
        elif r["stage"].startswith("reference"):
            tok_s, rss = (
                f"{ref_perf['latency']['decode_tok_s']['median']:.1f}",
                f"{ref_perf['peak_rss_bytes'] / 1e6:.0f}",
            )
        else:
            tok_s, rss = "", ""
        size = "" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.1f}"
        table.add_row(
            r["stage"],
            size,
            f"{r['kl_divergence_mean']:.4f}",
            pct(r["top1_agreement"]),
            f"{r['perplexity_delta_pct']:+.1f}%",
            pct(r["task_accuracy_artifact"]),
            _task_change(task := r.get("task_accuracy_paired")),
            f"{task['right_to_wrong']} / {task['wrong_to_right']}" if task else "",
            tok_s,
            rss,
        )
    return table


def _print_device_projection(d: dict) -> None:
    from .decode_model import describe_range

    for name, t in d["targets"].items():
        decode = t.get("decode_model") or {
            "basis": "ceiling",
            "estimate": t["decode_tok_s"],
            "high": t["decode_tok_s"],
        }
        tok_s = f"{describe_range(decode, '{:.0f}')} tok/s decode ({decode.get('basis')})"
        click.echo(
            f"{d['profile']['key']} (projected): {name} {'fits' if t['fits'] else 'does NOT fit'} "
            f"({t['ram_needed_bytes'] / 1e6:.0f} of {t['app_ram_bytes'] / 1e6:.0f} MB), {tok_s}"
        )


@cli.command()
@click.option("--config", type=click.Path(path_type=Path), help="edgeft.toml build config ([train] and [data])")
@click.option("--model", help="builtin name or local HF folder (default: the config's)")
@click.option(
    "--data", "train_file", type=click.Path(path_type=Path), help="chat JSONL (default: the config's [data].train)"
)
@click.option(
    "--validation",
    "validation_file",
    type=click.Path(path_type=Path),
    help="chat JSONL whose loss picks the kept checkpoint (default: the config's [data].validation, else a "
    "held-out share of the training data)",
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="adapter folder to write")
@click.option(
    "--device", type=_DEVICES, help="where training runs (overrides [train].device; default auto: a GPU if any)"
)
def train(
    config: Path | None,
    model: str | None,
    train_file: Path | None,
    validation_file: Path | None,
    out_dir: Path,
    device: str | None,
) -> None:
    """Train a LoRA/QLoRA adapter; writes a standard peft adapter folder + manifest.

    Resumes from its last checkpoint when a killed run is started again. Under
    `torchrun --nproc_per_node N -m edgeft train ...` every process trains and the first writes the adapter.
    """
    from .models import resolve_model
    from .preflight import check_train
    from .train import distributed
    from .train import train as run_train

    with _user_errors():
        cfg = _load_cfg(config, model)
        _train_device(cfg, device, "--device")
        data = train_file or cfg.data.train
        if data is None:
            raise ConfigError("--data: a training JSONL is required (or [data].train in --config)")
        if validation_file is not None:
            cfg.data.validation = validation_file
        check_train(cfg, data, out_dir)  # fail on bad input before materialising a model
        out = run_train(resolve_model(cfg.model), data, out_dir, cfg.train, validation_file=cfg.data.validation)
        rank, world = distributed()
        ranks = "" if world == 1 else f" (rank {rank} of {world}{'' if rank == 0 else ': trained; rank 0 wrote it'})"
        click.echo(f"adapter: {out.path}{' (cached)' if out.cached else ''}{ranks}")


@cli.command()
@click.option("--model", default="smollm2-135m", show_default=True, help="base: builtin name or local HF folder")
@click.option("--adapter", type=click.Path(path_type=Path), required=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option(
    "--strategy",
    type=click.Choice(["fp", "dequant", "auto"]),
    default="fp",
    show_default=True,
    help="QLoRA adapters: fold into the full-precision base (fp), the NF4-dequantized base (dequant), "
    "or measure both against the adapter on the 4-bit base and keep the closer (auto, needs --eval)",
)
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="held-out chat JSONL for --strategy auto")
def merge(model: str, adapter: Path, out_dir: Path, strategy: str, eval_file: Path | None) -> None:
    """Merge a LoRA adapter into a full-precision base; writes a safetensors Hugging Face folder."""
    from .merge import merge as run_merge
    from .models import resolve_model
    from .preflight import check_merge

    with _user_errors():
        strategy = check_merge(model, adapter, out_dir, strategy, eval_file)
        out = run_merge(resolve_model(model), adapter, out_dir, strategy, eval_file)
        results = out.manifest.get("results", {})
        kld = results.get("kld_vs_adapter_on_nf4_base")
        if kld:
            figures = ", ".join(f"{k} {v:.3g}" for k, v in kld.items())
            click.echo(f"merge strategy: {results['strategy']} (mean KLD vs the adapter on the NF4 base: {figures})")
        click.echo(f"merged model: {out.path}{' (cached)' if out.cached else ''}")


@cli.command()
@click.option("--model", required=True, help="builtin name or local HF folder")
@click.option(
    "--target",
    "target_name",
    default="gguf-f32",
    show_default=True,
    help="gguf-f32 or gguf-f16 (quantize next), or an ONNX target (onnx-int4, ...: quantized as it is written)",
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
def export(model: str, target_name: str, out_dir: Path) -> None:
    """Convert a Hugging Face model to a target's format (OUT/model.gguf, or an ONNX folder OUT).

    GGUF: families edgeft knows are written natively, other architectures go through llama.cpp's
    converter; quantized types come from `edgeft quantize` next."""
    from .formats import get_format
    from .stage import check_output_dir, check_replaceable
    from .targets import get_target

    with _user_errors():
        target = get_target(target_name)
        check_output_dir(out_dir)
        check_replaceable(out_dir)
        out, artifact = get_format(target.format).export_artifact(target, model, out_dir)
        click.echo(f"{target.format}: {artifact}{' (cached)' if out.cached else ''}")


@cli.command()
@click.option(
    "--from",
    "--gguf",
    "source_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="folder from `edgeft export` (--gguf: the older name)",
)
@click.option("--target", "target_name", default="gguf-q4", show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--threads", type=click.IntRange(0, 4096), default=0, help="quantizer threads (0: all cores)")
def quantize(source_dir: Path, target_name: str, out_dir: Path, threads: int) -> None:
    """Quantize an export (GGUF with llama.cpp: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, ...)."""
    from .formats import get_format
    from .stage import check_output_dir, check_replaceable
    from .targets import get_target

    with _user_errors():
        target = get_target(target_name)
        check_output_dir(out_dir)
        check_replaceable(out_dir)
        out, artifact = get_format(target.format).quantize_artifact(target, source_dir, out_dir, threads)
        types = ", ".join(f"{k}×{v}" for k, v in out.manifest["results"].get("tensor_types", {}).items())
        click.echo(f"{target.format}: {artifact}{f' [{types}]' if types else ''}{' (cached)' if out.cached else ''}")


@cli.command()
@click.option(
    "--build", "build_dir", type=click.Path(path_type=Path), required=True, help="an `edgeft build --out` folder"
)
@click.option("--target", "target", required=True, help="the built target to bundle, e.g. gguf-q4")
@click.option(
    "--out", "out", type=click.Path(path_type=Path), required=True, help="bundle folder (OUT.zip is written beside it)"
)
@click.option("--model", "model", help="base model name or folder, for its licence (default: the build's config)")
def package(build_dir: Path, target: str, out: Path, model: str | None) -> None:
    """Bundle a built target for an app: artifact, tokenizer, chat template, Modelfile, manifest.json; + a zip."""
    from .package import package as make_bundle

    with _user_errors():
        manifest = make_bundle(build_dir, target, out, model)
        size = sum(f["size"] for f in manifest["files"].values())
        click.echo(
            f"bundle: {out} and {out.name}.zip ({len(manifest['files'])} files, {size / 1e6:.1f} MB, licence {manifest['license']})"
        )


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def verify(bundle: Path) -> None:
    """Check a bundle folder or zip against its manifest (exit 2 on any missing, extra or changed file)."""
    from .package import verify as verify_bundle

    with _user_errors():
        manifest = verify_bundle(bundle)
        click.echo(
            f"ok: {bundle} — {manifest['target']} ({manifest['format']} {manifest['quant']}), {len(manifest['files'])} files match"
        )


@cli.command()
@click.option(
    "--build",
    "build_dir",
    type=click.Path(path_type=Path),
    help="an `edgeft build --out` folder: bench its --target artifacts",
)
@click.option("--target", "target_spec", help="with --build: target(s), comma-separated (default: every built one)")
@click.option(
    "--artifact",
    "artifacts",
    multiple=True,
    type=click.Path(path_type=Path),
    help="a .gguf file, a folder with model.gguf, or an ONNX folder with genai_config.json (repeatable)",
)
@click.option(
    "--reference",
    "reference_dir",
    type=click.Path(path_type=Path),
    help="a stored reference folder (no torch needed) or the fp32 HF folder of the fine-tuned model",
)
@click.option(
    "--eval",
    "eval_file",
    type=click.Path(path_type=Path),
    help="held-out chat JSONL with answers (with an HF --reference)",
)
@click.option("--config", type=click.Path(path_type=Path), help="edgeft.toml for [bench], [gates], [data].eval")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out/bench"), show_default=True)
@click.option(
    "--threads", type=click.IntRange(0, 4096), help="threads for every runtime (default: [bench].threads or all cores)"
)
@_device_options
@click.option(
    "--remote",
    metavar="[USER@]HOST",
    help="measure on that device over SSH (it needs `pip install 'edgeft[device]'`); the report comes back to --out",
)
@click.option(
    "--remote-ssh",
    default="ssh",
    show_default=True,
    help="with --remote: the ssh command line, e.g. 'ssh -p 2222 -i ~/.ssh/pi'",
)
@click.option("--remote-edgeft", default="edgeft", show_default=True, help="with --remote: edgeft's command there")
@click.option(
    "--remote-dir",
    default=".cache/edgeft/remote",
    show_default=True,
    help="with --remote: where files are kept there (relative to the login folder); uploads are reused",
)
@click.option(
    "--llama-bench",
    "llama_bench_file",
    type=click.Path(path_type=Path),
    help="with --build: import llama-bench's `-o json`/`-o jsonl` output as a measured device run (runs nothing)",
)
@click.option(
    "--sustained",
    "sustained_s",
    type=click.FloatRange(0, 3600),
    metavar="SECONDS",
    help="after the latency runs, decode continuously this long per artifact and report the first and last 20% "
    "of the tokens apart, so throttling shows (a phone, a fanless board)",
)
@_reference_dtype_option
@_gate_option
@_compare_option
def bench(
    build_dir: Path | None,
    target_spec: str | None,
    artifacts: tuple[Path, ...],
    reference_dir: Path | None,
    eval_file: Path | None,
    config: Path | None,
    out_dir: Path,
    threads: int | None,
    device: str | None,
    context: int,
    gate_flags: tuple[str, ...],
    compare_to: Path | None,
    remote: str | None,
    remote_ssh: str,
    remote_edgeft: str,
    remote_dir: str,
    llama_bench_file: Path | None,
    sustained_s: float | None,
    reference_dtype: str | None,
) -> None:
    """Measure artifacts against the fine-tuned reference; writes report.json/md, junit.xml, a plot.

    On a device: `--remote user@host` does it over SSH, or copy the build's `reference/` folder and
    the artifacts (.gguf files, ONNX folders) and run `edgeft bench --artifact model.gguf
    --reference reference/` there (needs no torch). Runs on other machines (--remote with --build,
    --llama-bench) are kept in the build and listed in its report.
    """
    from .bench.gates import parse_gate_flags
    from .devices import device_file as profile_file
    from .devices import get_device
    from .pipeline import bench_artifacts

    with _user_errors():
        if llama_bench_file is not None:
            if build_dir is None or artifacts or remote:
                raise ConfigError("--llama-bench: give it with --build DIR only (it imports, it measures nothing)")
            _import_llama_bench(build_dir, llama_bench_file)
            return
        cfg = _load_cfg(config, None)
        profile = None
        device_file = None
        if device is not None:
            profile = get_device(device)
            device_file = profile_file(device)
            cfg.bench.threads = profile.threads
        if threads is not None:
            cfg.bench.threads = threads
        if sustained_s is not None:
            cfg.bench.sustained_s = sustained_s
        cfg.gates = parse_gate_flags(gate_flags, cfg.gates)

        with rich_progress() as progress:
            report = bench_artifacts(
                cfg,
                out_dir,
                build_dir=build_dir,
                target_spec=target_spec,
                artifacts=list(artifacts),
                reference_dir=reference_dir,
                eval_file=eval_file,
                compare_to=compare_to,
                progress=progress,
                device=profile,
                context=context,
                remote=_remote(remote, remote_ssh, remote_edgeft, remote_dir) if remote else None,
                device_file=device_file,
                reference_dtype=reference_dtype,
            )
        _finish(report, out_dir)


def _remote(host: str, ssh: str, edgeft: str, workdir: str):
    from .remote import Remote

    try:
        argv = tuple(shlex.split(ssh))
    except ValueError as e:
        raise ConfigError(f"--remote-ssh {ssh!r}: {e}") from None
    return Remote(host, argv, edgeft, workdir)


def _import_llama_bench(build_dir: Path, path: Path) -> None:
    from .bench.device_runs import import_llama_bench
    from .report import refold

    record, stored = import_llama_bench(build_dir, path)
    refold(build_dir)
    table = Table(title=f"llama-bench on {record['machine']['cpu_model'] or 'an unnamed CPU'} (measured there)")
    for col in ("artifact", "threads", "prefill tok/s", "decode tok/s"):
        table.add_column(col, justify="left" if col == "artifact" else "right")
    for r in record["rows"]:
        cells = []
        for kind in ("prefill", "decode"):
            s = (r[kind] or {}).get("tok_s")
            cells.append("" if not s else f"{s.get('median', s['mean']):.1f} ({(r[kind] or {}).get('tokens')} tok)")
        table.add_row(r["target"] or f"{r['model']} (not in this build)", str(r["threads"] or ""), *cells)
    Console(stderr=False, markup=False).print(table)
    click.echo(f"stored as {stored}; {build_dir / 'report.md'} lists it under 'Measured on other machines'")


@cli.command()
@click.option(
    "--build", "build_dir", type=click.Path(path_type=Path), required=True, help="an `edgeft build --out` folder"
)
@click.option("--device", required=True, help="a device profile name (`edgeft devices`) or .toml path")
@click.option("--max-kld", type=click.FloatRange(0, None), help="largest mean KL divergence allowed (measured)")
@click.option("--min-tok-s", type=click.FloatRange(0, None), help="slowest decode allowed on the device (projected)")
@click.option(
    "--context", type=click.IntRange(1, 1 << 20), default=2048, show_default=True, help="context the app will use"
)
@click.option("--json", "as_json", is_flag=True, help="print the table as JSON")
def recommend(
    build_dir: Path, device: str, max_kld: float | None, min_tok_s: float | None, context: int, as_json: bool
) -> None:
    """The smallest built target that fits a device and meets a fidelity and speed budget, with the table behind it.

    Exit 1 when no built target meets the budget."""
    from .decode_model import describe_range
    from .devices import get_device
    from .devices import recommend as recommend_targets
    from .machine import summary as machine_summary
    from .report import timed_in_run

    with _user_errors():
        result = recommend_targets(build_dir, get_device(device), max_kld, min_tok_s, context)
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            w = max(16, *(len(r["target"]) + 1 for r in result["rows"]))
            click.echo(
                f"{'target':{w}} {'MB':>7} {'KLD':>8} {'task acc':>8} {'tok/s here':>10} {'tok/s ' + device + ' (proj.)':>22} {'RAM MB (proj.)':>15}  verdict"
            )
            # Rows timed in different runs compare with care (load differs): one mark per run when mixed.
            runs = list(dict.fromkeys(r["timed"]["run_id"] for r in result["rows"]))
            for r in result["rows"]:
                acc = "n/a" if r["task_accuracy"] is None else f"{100 * r['task_accuracy']:.1f}%"
                proj = describe_range(
                    {
                        "estimate": r["decode_tok_s_projected"],
                        "low": r["decode_tok_s_projected_low"],
                        "high": r["decode_tok_s_projected_high"],
                        "basis": r["decode_basis"],
                    }
                )
                here = f"{r['decode_tok_s_measured_here']:.1f}"
                if len(runs) > 1:
                    here += " " + timed_in_run(runs.index(r["timed"]["run_id"]) + 1)
                click.echo(
                    f"{r['target']:{w}} {r['size_bytes'] / 1e6:7.1f} {r['kl_divergence_mean']:8.4f} {acc:>8} "
                    f"{here:>10} {proj:>22} {r['ram_needed_bytes_projected'] / 1e6:15.0f}  "
                    f"{'ok' if r['meets'] else r['why_not']}"
                )
            if len(runs) > 1:
                for i, run in enumerate(runs, 1):
                    t = next(r["timed"] for r in result["rows"] if r["timed"]["run_id"] == run)
                    where = machine_summary(t["machine"]) if t.get("machine") else "machine not recorded"
                    click.echo(f"{timed_in_run(i)} timed {t.get('timed_at') or 'before runs were recorded'} on {where}")
                click.echo("tok/s here comes from different runs: compare those rows with care")
            click.echo(
                f"recommended for {device}: {result['choice'] or 'none meets the budget'} (speeds on the device are "
                f"projected: {_BASIS[result['rows'][0]['decode_basis']] if result['rows'] else ''}; --min-tok-s compares "
                "the estimate)"
            )
        if result["choice"] is None:
            sys.exit(1)


@cli.group(invoke_without_command=True)
@click.pass_context
def devices(ctx: click.Context) -> None:
    """List the device profiles (`edgeft bench --device NAME`); `devices calibrate` fits one to your runs."""
    from .devices import available_devices

    if ctx.invoked_subcommand is not None:
        return
    with _user_errors():
        for key, d in available_devices().items():
            fit = d.fit_for("llama.cpp")
            if fit is not None:
                decode = f"decode {fit.per_token_ms:.2f} ms/token + {fit.bandwidth_gb_s:.1f} GB/s (fitted, llama.cpp)"
            else:
                decode = f"decode bandwidth {d.effective_bandwidth_gb_s:g} GB/s effective (published/assumed)"
            click.echo(f"{key:17} {d.threads} threads · app RAM {d.app_ram_gb:g} GB · {decode} · {d.name}")


@devices.command("calibrate")
@click.argument("name")
@click.option(
    "--llama-bench",
    "llama_bench_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="llama-bench -o json/jsonl output measured on the device (repeatable); its tgN tests are fitted",
)
@click.option(
    "--report",
    "report_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="an edgeft report.json measured on the device (repeatable); every target's decode speed is fitted",
)
@click.option(
    "--out", type=click.Path(path_type=Path), help="the profile to write (default: NAME-calibrated.toml here)"
)
def devices_calibrate(
    name: str, llama_bench_files: tuple[Path, ...], report_files: tuple[Path, ...], out: Path | None
) -> None:
    """Fit a device's per-token cost and bandwidth from its own runs and write a profile of your own.

    NAME is the profile to start from (`rpi5`, or a .toml path); runs of at least two artifact sizes
    at one thread count are needed. Use the written file with `--device FILE`."""
    from .bench.device_runs import now
    from .calibrate import calibrate, write_profile

    with _user_errors():
        args = [name, *(a for p in llama_bench_files for a in ("--llama-bench", str(p)))]
        args += [a for p in report_files for a in ("--report", str(p))]
        command = shlex.join(["edgeft", "devices", "calibrate", *args])
        result, key = calibrate(name, list(llama_bench_files), list(report_files), now(), command)
        path = write_profile(out or Path(f"{Path(key).stem}-calibrated.toml"), result.profile_text)
        for f in result.fits:
            click.echo(
                f"{f.runtime}, {f.threads} threads: {f.per_token_ms:.2f} ms per token + {f.bandwidth_gb_s:.2f} GB/s "
                f"(band ±{f.uncertainty_pct:.0f}%), from {len(f.runs)} runs"
            )
            for r in f.runs:
                click.echo(
                    f"  {r.model[:40]:40} {r.type[:24]:24} {r.size_bytes / 1e6:8.1f} MB  measured {r.tok_s:7.1f}  "
                    f"fitted {r.fitted_tok_s:7.1f} tok/s  ({r.residual_pct:+.1f}%)"
                )
        for note in result.notes:
            click.echo(f"note: {note}")
        for w in result.warnings:
            click.echo(f"edgeft: warning: {w}", err=True)
        click.echo(f"wrote {path} ({result.threads} threads); use it with --device {path}")


@cli.command()
def targets() -> None:
    """List the build targets."""
    from .targets import available_targets

    with _user_errors():
        found = sorted(available_targets().values(), key=lambda t: t.name)
        width = max((len(t.name) for t in found), default=0)
        for t in found:
            click.echo(f"{t.name:{width}}  {t.format:6} {t.quant:8} {t.description}")


def main() -> None:
    """Run the CLI; click's usage errors become one ``edgeft: error:`` line like ours (exit 2), and
    an exception outside any command's body (Click's own machinery, the group callback) an internal
    error like one inside it (exit 3)."""
    try:
        code = cli.main(prog_name="edgeft", standalone_mode=False)
    except click.ClickException as e:
        message = " ".join(e.format_message().split())
        click.echo(f"edgeft: error: {message}", err=True)
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("edgeft: aborted", err=True)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("EDGEFT_RAISE_ERRORS"):
            raise
        _internal_error(e)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
