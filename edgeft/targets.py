"""Build targets are data: one TOML file per target under ``targets/``.

A target names an output format and a quantization type. Adding ``targets/gguf-q3.toml`` with
``format = "gguf"`` and ``quant = "Q3_K_M"`` needs no code; a new *format* does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import tomllib

from .errors import ConfigError
from .quantize.gguf_types import GGUF_QUANT_TYPES, UNQUANTIZED

FORMATS = ("gguf",)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


@dataclass(frozen=True)
class Target:
    name: str
    format: str
    quant: str
    description: str = ""

    @property
    def needs_quantize(self) -> bool:
        """F32/F16 come straight out of the exporter; everything else goes through llama.cpp."""
        return self.quant not in UNQUANTIZED


def targets_dir() -> Path:
    env = os.environ.get("EDGEFT_TARGETS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "targets"


def _load(path: Path) -> Target:
    name = path.stem
    if not _NAME.match(name):
        raise ConfigError(f"{path}: target names are lowercase letters, digits, '-', '_' and '.'")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    unknown = set(raw) - {"format", "quant", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}; expected format, quant, description")
    fmt, quant = raw.get("format"), raw.get("quant")
    if fmt not in FORMATS:
        raise ConfigError(f"{path}: format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if quant not in GGUF_QUANT_TYPES:
        raise ConfigError(f"{path}: quant: expected one of {', '.join(GGUF_QUANT_TYPES)}, got {quant!r}")
    return Target(name=name, format=fmt, quant=quant, description=raw.get("description", ""))


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


def parse_target_list(spec: str) -> list[Target]:
    """``gguf-q8,gguf-q4`` → targets, in order, duplicates dropped."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("--target: expected at least one target name")
    return [get_target(n) for n in dict.fromkeys(names)]
