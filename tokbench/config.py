"""tokbench.toml: model aliases and defaults. The project's file is read first, then ./tokbench.toml."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_CONFIG = Path(__file__).resolve().parent / "tokbench.toml"  # in a checkout: a link to PROJECT_ROOT's


class ConfigError(ValueError):
    """An unreadable or malformed tokbench.toml."""


@dataclass
class Config:
    defaults: dict[str, Any] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    judge: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}; fix the TOML syntax there") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None


def load_config(extra: Path | None = None) -> Config:
    """Merge the project's tokbench.toml, ./tokbench.toml and ``extra`` (later files win per key)."""
    config = Config()
    candidates = [PACKAGE_CONFIG, Path.cwd() / "tokbench.toml"]
    if extra is not None:
        candidates.append(extra)
    seen: set[Path] = set()
    for path in candidates:
        if not path.exists() or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        data = _read(path)
        for section in ("defaults", "models", "judge"):
            value = data.get(section, {})
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            getattr(config, section).update(value)
        config.sources.append(str(path))
    return config
