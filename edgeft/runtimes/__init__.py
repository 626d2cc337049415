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


def load_runtime(name: str, model: Path, *, threads: int, scoring: bool = False):
    """``name``'s runtime with ``model`` loaded. ``scoring`` keeps logits at every position
    (fidelity); without it only the last position's, as an app decodes (timing)."""
    if name not in RUNTIMES:
        raise ConfigError(f"runtime {name!r}: expected one of {', '.join(RUNTIMES)}")
    return importlib.import_module(RUNTIMES[name]).load(Path(model), threads, scoring)
