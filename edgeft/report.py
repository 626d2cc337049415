"""report.json (the contract CI and other tools read) and report.md (for people).

report.json, schema_version 1 — keys other tools may rely on:

* ``target``; ``passed`` (all gates passed)
* ``artifact.{path, format, quant, size_bytes, sha256, tensor_types}``
* ``reference.{path, size_bytes, dtype}``
* ``fidelity.{perplexity_reference, perplexity_artifact, perplexity_delta_pct, kl_divergence_mean,
  kl_divergence_p99, top1_agreement, task_accuracy_base, task_accuracy_reference,
  task_accuracy_artifact}`` (accuracies and agreement as fractions 0–1)
* ``latency.{threads, decode_tok_s, reference_decode_tok_s, speedup}`` (medians; the spreads are
  under ``latency.artifact`` and ``latency.reference``)
* ``gates``: list of ``{name, limit, value, passed}``; ``stages``: wall seconds and cache hits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _spread(s: dict[str, float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}–{fmt.format(s['max'])}]"


def render_markdown(report: dict[str, Any]) -> str:
    f, lat, art = report["fidelity"], report["latency"], report["artifact"]
    types = ", ".join(f"{k}×{v}" for k, v in art.get("tensor_types", {}).items()) or "n/a"
    lines = [
        f"# edgeft report — {report['target']} ({art['quant']})",
        "",
        f"**{'PASSED' if report.get('passed') else 'FAILED'}** · artifact `{art['path']}` · "
        f"{art['size_bytes'] / 1e6:.1f} MB (reference {report['reference']['size_bytes'] / 1e6:.1f} MB fp32)",
        "",
        f"Tensor types actually written: {types}",
        "",
        "## Task accuracy on held-out questions",
        "",
        "| model | accuracy |",
        "|---|---:|",
        f"| base (not fine-tuned, fp32) | {_pct(f.get('task_accuracy_base'))} |",
        f"| fine-tuned reference (fp32, torch) | {_pct(f['task_accuracy_reference'])} |",
        f"| artifact ({art['quant']}, llama.cpp) | {_pct(f['task_accuracy_artifact'])} |",
        "",
        f"Artifact answers that ended on a stop token: {_pct(f.get('artifact_stop_rate'))}.",
        "",
        f"## Fidelity vs the fine-tuned reference ({f['positions']} reply tokens)",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| mean KL divergence | {f['kl_divergence_mean']:.5f} |",
        f"| 99th percentile KL divergence | {f['kl_divergence_p99']:.5f} |",
        f"| top-1 agreement | {_pct(f['top1_agreement'])} |",
        f"| perplexity reference | {f['perplexity_reference']:.4f} ± {f['perplexity_reference_err']:.4f} |",
        f"| perplexity artifact | {f['perplexity_artifact']:.4f} ± {f['perplexity_artifact_err']:.4f} |",
        f"| perplexity delta | {f['perplexity_delta_pct']:+.2f}% |",
        "",
        f"## Speed ({lat['threads']} threads, median [min–max] of {lat['artifact']['repeats']})",
        "",
        "| runtime | decode tok/s | time to first token ms |",
        "|---|---:|---:|",
        f"| reference ({lat['reference']['runtime_version']}) | {_spread(lat['reference']['decode_tok_s'])} | "
        f"{_spread(lat['reference']['ttft_ms'], '{:.0f}')} |",
        f"| artifact ({lat['artifact']['runtime_version']}) | {_spread(lat['artifact']['decode_tok_s'])} | "
        f"{_spread(lat['artifact']['ttft_ms'], '{:.0f}')} |",
        "",
        f"Artifact decode is {lat['speedup']:.1f}× the fp32 reference.",
    ]
    if report.get("gates"):
        lines += ["", "## Gates", "", "| gate | limit | value | result |", "|---|---:|---:|---|"]
        for g in report["gates"]:
            value = "n/a" if g["value"] is None else f"{g['value']:.4g}"
            lines.append(f"| {g['description']} ({g['name']}) | {g['limit']:.4g} | {value} | {'pass' if g['passed'] else '**FAIL**'} |")
    if report.get("samples"):
        lines += ["", "## Sample answers", "", "| question | expected | reference | artifact |", "|---|---|---|---|"]
        for s in report["samples"]:
            cells = [s[k].replace("|", "\\|").replace("\n", " ") for k in ("question", "expected", "reference", "artifact")]
            lines.append("| " + " | ".join(cells) + " |")
    if report.get("stages"):
        lines += ["", "## Stages", "", "| stage | seconds | cached |", "|---|---:|---|"]
        for s in report["stages"]:
            lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {'yes' if s['cached'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_reports(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write report.json and report.md; append the markdown to $GITHUB_STEP_SUMMARY when set."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = render_markdown(report)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    _atomic_write(json_path, json.dumps(report, indent=2) + "\n")
    _atomic_write(md_path, md)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as fh:
            fh.write(md)
    return json_path, md_path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
