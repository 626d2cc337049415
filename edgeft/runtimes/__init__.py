"""Runtimes, looked up by name: the full-precision reference and one per artifact format.

Every runtime offers the interface in :mod:`edgeft.runtimes.base` and a module-level
``load(model, threads, scoring)``. A runtime's module is imported only when it is loaded, so a
device install without torch (or without onnxruntime) can still run the others.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import ConfigError

# runtime name → module holding its load()
RUNTIMES: dict[str, str] = {
    "torch": "edgeft.runtimes.torch",
    "llama.cpp": "edgeft.runtimes.llamacpp",
    "onnxruntime-genai": "edgeft.runtimes.onnxruntime_genai",
}


def load_runtime(name: str, model: Path, *, threads: int, scoring: bool = False, dtype: str | None = None):
    """``name``'s runtime with ``model`` loaded. ``scoring`` keeps logits at every position
    (fidelity); without it only the last position's, as an app decodes (timing). ``dtype``: torch
    only, what it loads the weights in (the reference's); an artifact's precision is its file's."""
    if name not in RUNTIMES:
        raise ConfigError(f"runtime {name!r}: expected one of {', '.join(RUNTIMES)}")
    module = importlib.import_module(RUNTIMES[name])
    if dtype is None:
        return module.load(Path(model), threads, scoring)
    if name != "torch":
        raise ConfigError(f"runtime {name}: --dtype applies to torch only, got {dtype!r}")
    return module.load(Path(model), threads, scoring, dtype=dtype)
