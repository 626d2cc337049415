"""Build targets are data: one TOML file per target under ``targets/``.

A target names an output format, a quantization type and the format's own options (see each
format's ``TARGET_KEYS``). Adding ``targets/gguf-q3.toml`` with ``format = "gguf"`` and
``quant = "Q3_K_M"`` needs no code; a new *format* is a package under :mod:`edgeft.formats`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import data_dir
from .formats import FORMATS, get_format
from .loading import read_toml

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_COMMON_KEYS = ("format", "quant", "description")


@dataclass(frozen=True)
class Target:
    name: str
    format: str
    quant: str
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict, compare=False)  # the format's own knobs


def targets_dir() -> Path:
    env = os.environ.get("EDGEFT_TARGETS")
    return Path(env) if env else data_dir("targets")


def _load(path: Path) -> Target:
    name = path.stem
    if not _NAME.match(name):
        raise ConfigError(f"{path}: target names are lowercase letters, digits, '-', '_' and '.'")
    raw = read_toml(path, "target file")
    fmt_name = raw.get("format")
    if fmt_name not in FORMATS:
        raise ConfigError(f"{path}: format: expected one of {', '.join(FORMATS)}, got {fmt_name!r}")
    fmt = get_format(fmt_name)
    known = (*_COMMON_KEYS, *fmt.TARGET_KEYS)
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}; expected {', '.join(known)}")
    quant, description = raw.get("quant"), raw.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{path}: description: expected a string, got {description!r}")
    options = {k: v for k, v in raw.items() if k not in _COMMON_KEYS}
    fmt.check_target(name, quant, options, str(path))
    return Target(name=name, format=fmt_name, quant=quant, description=description, options=options)


def available_targets() -> dict[str, Target]:
    return {t.name: t for t in map(_load, sorted(targets_dir().glob("*.toml")))}


def get_target(name: str) -> Target:
    """A target by short name, or by the path of a target TOML file."""
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"{name}: target file not found")
        return _load(path)
    targets = available_targets()
    if name not in targets:
        raise ConfigError(f"unknown target {name!r}; valid targets: {', '.join(targets)}")
    return targets[name]


def with_overrides(target: Target, overrides: dict[str, Any], where: str) -> Target:
    """``target`` with the format options a build config sets for it (``[targets.<name>]``), checked
    as a target file's would be: a size budget is a property of the model as much as of the target,
    so a config for a larger model can keep the target's name and raise its ``max_size_mb``."""
    fmt = get_format(target.format)
    unknown = set(overrides) - set(fmt.TARGET_KEYS)
    if unknown:
        expected = ", ".join(fmt.TARGET_KEYS) or "none"
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; a {target.format} target takes {expected}")
    options = {**target.options, **overrides}
    fmt.check_target(target.name, target.quant, options, where)
    return Target(
        name=target.name, format=target.format, quant=target.quant, description=target.description, options=options
    )


def apply_overrides(targets: list[Target], overrides: dict[str, dict[str, Any]], source: str) -> list[Target]:
    """Each target with its ``[targets.<name>]`` table from the build config applied."""
    return [
        with_overrides(t, overrides[t.name], f"{source}: [targets.{t.name}]") if t.name in overrides else t
        for t in targets
    ]


def parse_target_list(spec: str) -> list[Target]:
    """``gguf-q8,gguf-q4`` → targets, in order, duplicates dropped."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("--target: expected at least one target name")
    return [get_target(n) for n in dict.fromkeys(names)]
