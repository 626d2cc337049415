"""Stage `export` for ONNX: the merged HF folder → an onnxruntime-genai model folder, via its builder.

The exporter is onnxruntime-genai's model builder (``onnxruntime_genai.models.builder``): it writes
a KV-cache decoder with fused attention (GroupQueryAttention), quantizes MatMuls to MatMulNBits
(int8/int4, block-wise) in the same pass, and emits ``genai_config.json`` and the tokenizer files an
app loads. optimum's ONNX exporter is not used: it moved to ``optimum-onnx``, whose only release
requires transformers < 4.58, which cannot be installed beside this stack.

The builder runs in a child process (``python -m edgeft.formats.onnx.export``): it puts its own
folder on ``sys.path``, logs to stdout, and holds a second copy of the model while it writes; none of
that belongs in the build process. A model it cannot export is a ModelError carrying its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ...errors import ModelError, first_line
from ...models import check_model_dir
from ...stage import StageOutput, content_hash, run_stage
from .types import PRECISIONS


def builder_options(options: dict[str, Any]) -> list[str]:
    """Target knobs → the builder's ``extra_options`` (a list of KEY=VALUE strings)."""
    extra = ["hf_token=false"]  # never look for a hub login: the model is a local folder
    for key, value in sorted(options.items()):
        if key == "exclude_lm_head_quant":
            if value:  # the head stays fp32; a tied embedding cannot then share its quantized weights
                extra += ["nodes_to_exclude=/lm_head/MatMul", "shared_embeddings=false"]
            continue
        extra.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return extra


def write_onnx(
    model_dir: Path,
    out_dir: Path,
    quant: str,
    options: dict[str, Any],
    timeout: float = 1800,
    overrides: list[dict[str, Any]] | None = None,
) -> dict:
    """Run the builder for ``model_dir`` into ``out_dir`` (which must exist and be empty).
    ``overrides``: per-node weight types (``quant_config.weights.overrides``, e.g. a mixed plan's
    ``{"match": {"name": "/model/layers.3/attn/qkv_proj/MatMul"}, "type": "int8"}``)."""
    check_model_dir(model_dir)
    cache = out_dir.parent / f".{out_dir.name}.builder-cache"
    cmd = [
        sys.executable, "-m", "edgeft.formats.onnx.export",
        "--model", str(model_dir), "--out", str(out_dir), "--precision", PRECISIONS[quant], "--cache", str(cache),
        *[f"--option={o}" for o in builder_options(options)],
    ]  # fmt: skip
    if overrides:
        cmd.append("--overrides=" + json.dumps(overrides))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise ModelError(f"{model_dir}: the ONNX builder did not finish in {timeout:g} s") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise ModelError(
            f"{model_dir}: onnxruntime-genai's builder cannot export it: {lines[-1][:300] if lines else 'no output'}"
        )
    done_info = {"precision": PRECISIONS[quant], "builder_options": builder_options(options), "exporter": _versions()}
    if overrides:
        done_info["weight_overrides"] = len(overrides)
    return done_info


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnxruntime-genai", "onnxruntime", "onnx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def export(
    model_dir: Path,
    out_dir: Path,
    quant: str,
    options: dict[str, Any],
    overrides: list[dict[str, Any]] | None = None,
    record: dict[str, Any] | None = None,
    rounding: tuple[Path, Path] | None = None,
) -> StageOutput:
    """Cached stage: ``out_dir`` becomes an onnxruntime-genai folder of ``model_dir`` in ``quant``
    (``record``: what the manifest should also say, e.g. the plan the overrides come from).
    ``rounding``: (fp32 export, importance stage) to re-round the int4 MatMuls from, weighted by
    that importance (see :mod:`.rounding`), instead of the builder's round-to-nearest."""
    inputs = {"model": content_hash(model_dir)}
    params: dict[str, Any] = {"quant": quant, "options": options}
    if overrides:
        params["overrides"] = overrides
    if rounding:
        inputs |= {"fp32": content_hash(rounding[0]), "importance": content_hash(rounding[1])}

    def work(tmp: Path) -> dict[str, Any]:
        done = {**write_onnx(model_dir, tmp, quant, options, overrides=overrides), **(record or {})}
        if rounding:
            from .rounding import read_importance, reround

            done["rounding"] = reround(tmp, rounding[0], read_importance(rounding[1]))
        return done

    return run_stage(out_dir, "export", inputs, params, work)


# ------------------------------------------------------------------------------------- child process


def _build(model: str, out: str, precision: str, cache: str, options: list[str], overrides: str | None) -> None:
    from onnxruntime_genai.models import builder

    # The builder's own two steps, as its __main__ runs them (its --help crashes on a '%' in a help string).
    structured = {}
    if overrides:  # per-node types go through the builder's structured options (builder_config_version 2)
        weights: dict = {"overrides": json.loads(overrides)}
        # that path does not carry the tied embedding into the quantizer's op types as the legacy one
        # does (the embedding would stay an fp32 table): name the Gather when it can share the int4
        # head (an int8 head cannot be shared by GatherBlockQuantized: the table then stays fp32)
        head_int4 = not any(o["match"].get("name") == "/lm_head/MatMul" for o in weights["overrides"])
        if head_int4 and "shared_embeddings=false" not in options and _ties_embeddings(model):
            weights["op_types"] = ["MatMul", "Gather"]
        structured["target_options"] = {"quant_config": {"weights": weights}}
    extra = builder.parse_extra_options(None, model, out, precision, "cpu", cache, options, **structured)
    builder.create_model(None, model, out, precision, "cpu", cache, **extra)


def _ties_embeddings(model: str) -> bool:
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(model), "tie_word_embeddings", False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeft.formats.onnx.export")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--precision", required=True, choices=sorted(set(PRECISIONS.values())))
    parser.add_argument("--cache", required=True)
    parser.add_argument("--option", action="append", default=[])
    parser.add_argument("--overrides", default=None, help="JSON list of the builder's weight overrides")
    a = parser.parse_args(argv)
    try:
        _build(a.model, a.out, a.precision, a.cache, a.option, a.overrides)
    except ImportError as e:
        print(f"onnxruntime-genai is not installed ({first_line(e)}): pip install 'edgeft[onnx]'", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the parent reports the builder's failure on the user's model
        print(f"{type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
