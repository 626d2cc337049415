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
import ctypes
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ...errors import ModelError, first_line
from ...models import check_model_dir
from ...stage import StageOutput, content_hash, run_stage
from .rounding import read_importance, reround
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
    stock: bool = False,
) -> dict:
    """Run the builder for ``model_dir`` into ``out_dir`` (which must exist and be empty).
    ``overrides``: per-node weight types (``quant_config.weights.overrides``, e.g. a mixed plan's
    ``{"match": {"name": "/model/layers.3/attn/qkv_proj/MatMul"}, "type": "int8"}``).
    ``stock``: the builder's save as shipped, without edgeft's memory glue (the reference the glue is
    tested against: same bytes, more memory). The result carries the builder process's peak RSS."""
    check_model_dir(model_dir)
    cache = out_dir.parent / f".{out_dir.name}.builder-cache"
    cmd = [
        sys.executable, "-m", "edgeft.formats.onnx.export",
        "--model", str(model_dir), "--out", str(out_dir), "--precision", PRECISIONS[quant], "--cache", str(cache),
        *[f"--option={o}" for o in builder_options(options)],
    ]  # fmt: skip
    if overrides:
        cmd.append("--overrides=" + json.dumps(overrides))
    if stock:
        cmd.append("--stock")
    # GIT_DIR: the builder stamps model.onnx's producer_version with `git rev-parse HEAD` run beside
    # its own files, which names whatever checkout the virtual environment sits in (the same export
    # then hashes differently after every commit there); failing, it falls back to its own commit
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GIT_DIR": os.devnull}
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
    peaks = [ln[len(_PEAK) :] for ln in done.stdout.splitlines() if ln.startswith(_PEAK)]
    done_info["builder_peak_rss_bytes"] = int(peaks[-1]) if peaks and peaks[-1].isdigit() else None
    return done_info


def _versions() -> dict[str, str]:
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
            done["rounding"] = reround(tmp, rounding[0], read_importance(rounding[1]))
        return done

    return run_stage(out_dir, "export", inputs, params, work)


# ------------------------------------------------------------------------------------- child process


def _build(
    model: str, out: str, precision: str, cache: str, options: list[str], overrides: str | None, lean: bool = True
) -> None:
    from onnxruntime_genai.models import builder

    # absolute paths: the quantization below runs in the builder's cache folder (see _lean_builder)
    model, out, cache = (os.path.abspath(p) for p in (model, out, cache))
    if lean:
        _lean_builder(builder.Model, Path(model))
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


# ----------------------------------------------------------------- the builder's memory (child process)
#
# onnxruntime-genai 0.18's builder, left alone, holds 2.2-2.6 fp32 copies of the model at its peak
# while it writes a quantized folder (7.2 GB int8, 6.7 GB int4 for a 0.5B model of 2.5 GB), 1.3 for fp32:
#  - transformers maps model.safetensors (a private file mapping) and every page the builder reads
#    stays resident: by the end of the save the mapping is a whole fp32 copy;
#  - ``Model.to_nbits`` hands the quantizer ``ir.to_proto(self.model)``, a second fp32 copy in memory;
#    the quantizer adds each quantized weight beside its fp32 one and drops the fp32 ones at the end.
# Two wrappers, checked against onnxruntime-genai 0.18.0's ``Model.save_model`` and ``Model.to_nbits``
# (GLUE_CHECKED) with onnx-ir 1.1.0, move the bytes and change none (tests/test_onnx.py compares the
# folders byte for byte with the builder's own save, ``--stock``, for fp32, int4, k_quant, mixed plans):
#  1. ``save_model``: every initializer is read through a LazyTensor that first gives back the mapped
#     pages of the weights read before it (madvise DONTNEED: the file stays, a later read refaults);
#  2. ``to_nbits``: the initializers are first streamed into a file in the builder's cache folder
#     (``ir.external_data.convert_tensors_to_external``), so the proto the quantizer gets refers to that
#     file and the quantizer maps one weight at a time. The proto's locations are relative: the quantizer
#     runs in that folder. The cost: a temporary fp32 copy on disk, written once, deleted after the save.
# What is left at the peak: the process's own ~0.4 GB, the largest tensor twice (the builder's transposed
# copy beside its mapped pages) or, quantized, the largest beside the quantized weights held until the
# save (the 0.5B: 1.7 GB fp32 and int4, 2.0 GB int8). The rtn/k_quant algorithms (neural-compressor's
# rtn_quantize) load every weight into the proto themselves: 6.1 GB there (11.2 GB left alone).

GLUE_CHECKED = ("0.18.0",)  # onnxruntime-genai versions the glue was compared against (tests/test_onnx.py)
_PEAK = "edgeft: builder peak RSS bytes: "  # the child's last line: its own VmHWM (not its parent's)
RELEASE_EVERY_BYTES = 128 << 20  # bytes read between two releases of the mapped weights
_MADV_DONTNEED = 4


def _lean_builder(model_class: type, folder: Path) -> None:
    """Wrap ``model_class.save_model`` and ``.to_nbits`` as described above (in this process only)."""
    import onnx_ir as ir

    for name in ("save_model", "to_nbits"):
        if not callable(getattr(model_class, name, None)):  # fails the equivalence tests, loudly
            raise RuntimeError(f"onnxruntime-genai's builder has no Model.{name}: edgeft's export glue needs updating")
    save_model, to_nbits = model_class.save_model, model_class.to_nbits
    pages = _MappedWeights(folder)
    spills: list[str] = []  # a composite model (decoder + MTP head) saves several graphs

    def lean_save_model(self, out_dir):
        for value in self.model.graph.initializers.values():
            if value.const_value is not None:
                value.const_value = pages.read_through(value.const_value)
        try:
            return save_model(self, out_dir)
        finally:
            while spills:
                Path(spills.pop()).unlink(missing_ok=True)

    def lean_to_nbits(self):
        spill_dir = os.path.abspath(self.cache_dir)
        spill = f"edgeft-unquantized-{len(spills)}.data"
        spills.append(os.path.join(spill_dir, spill))
        values = [
            v for v in self.model.graph.initializers.values() if v.const_value is not None and v.const_value.nbytes
        ]
        spilled = ir.external_data.convert_tensors_to_external([v.const_value for v in values], spill_dir, spill)
        for value, tensor in zip(values, spilled):
            value.const_value = tensor
        del values, spilled
        pages.release()  # nothing reads the model's own files from here on
        here = os.getcwd()
        os.chdir(spill_dir)  # the proto's external locations are relative to it
        try:
            quantized = to_nbits(self)
        finally:
            os.chdir(here)
        ir.external_data.set_base_dir(quantized.graph, spill_dir)  # the weights left unquantized
        return quantized

    model_class.save_model, model_class.to_nbits = lean_save_model, lean_to_nbits


class _MappedWeights:
    """The model folder's safetensors files as mapped in this process (by transformers), and a way to
    give their resident pages back. Only a mapping none of whose pages was ever written (no anonymous
    pages) is released: dropping it loses nothing, a later read refaults from the file."""

    def __init__(self, folder: Path) -> None:
        self.prefix = str(folder.resolve()) + os.sep
        self.read = 0
        try:
            self._madvise = ctypes.CDLL(None, use_errno=True).madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError, TypeError):  # no libc madvise: nothing is released
            self._madvise = None

    def read_through(self, tensor):
        """``tensor`` behind a LazyTensor that releases the pages read before it, every so often."""
        import onnx_ir as ir

        def func():
            if self.read >= RELEASE_EVERY_BYTES:
                self.release()
            self.read += tensor.nbytes
            return tensor

        return ir.LazyTensor(
            func, tensor.dtype, tensor.shape, name=tensor.name, doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props) or None,
        )  # fmt: skip

    def release(self) -> None:
        self.read = 0
        for start, end in self._regions() if self._madvise else ():
            self._madvise(start, end - start, _MADV_DONTNEED)

    def _regions(self) -> list[tuple[int, int]]:
        """[start, end) of every mapping of a safetensors file in the folder with no anonymous page
        (none where /proc/self/smaps is missing: not Linux)."""
        regions, current = [], None
        try:
            with open("/proc/self/smaps") as f:
                lines = f.readlines()
        except OSError:
            return []
        for line in lines:
            head = line.split(maxsplit=5)
            if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                path = head[5].strip() if len(head) == 6 else ""
                wanted = path.startswith(self.prefix) and path.endswith(".safetensors")
                current = tuple(int(x, 16) for x in head[0].split("-")) if wanted else None
            elif current and head and head[0] == "Anonymous:":
                if int(head[1]) == 0:
                    regions.append(current)
                current = None
        return regions


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
    parser.add_argument("--stock", action="store_true", help="the builder's save as shipped (no memory glue)")
    a = parser.parse_args(argv)
    try:
        _build(a.model, a.out, a.precision, a.cache, a.option, a.overrides, lean=not a.stock)
    except ImportError as e:
        print(f"onnxruntime-genai is not installed ({first_line(e)}): pip install 'edgeft[onnx]'", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the parent reports the builder's failure on the user's model
        print(f"{type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return 1
    print(f"{_PEAK}{_peak_rss()}", flush=True)
    return 0


def _peak_rss() -> str:
    """This process's high-water RSS since its exec (``VmHWM``; ``ru_maxrss`` would include the RSS
    of the process it was forked from), or an empty string where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            return next((str(int(ln.split()[1]) * 1024) for ln in f if ln.startswith("VmHWM:")), "")
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
