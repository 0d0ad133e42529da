"""tokbench.toml: model aliases and defaults. The project's file is read first, then ./tokbench.toml,
then the file ``--config`` names (which must exist). Every value is type-checked when read, so a bad
value is one line naming the file and the key, not a traceback later."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_CONFIG = Path(__file__).resolve().parent / "tokbench.toml"  # in a checkout: a link to PROJECT_ROOT's

# [defaults] keys and their types; the CLI's options override them (tokbench/cli/build.py).
DEFAULT_TYPES: dict[str, type] = {
    "output": str,
    "dtype": str,
    "attn_implementation": str,
    "batch_size": int,
    "warmup": int,
    "seed": int,
}
# [judge] keys and their types (tokbench.judge.JudgeConfig.from_table reads them).
JUDGE_TYPES: dict[str, type] = {"url": str, "judge": str, "model": str, "key_env": str, "concurrency": int, "retries": int,
               "timeout": float, "retry_budget": int}


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
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}; fix the TOML syntax there") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None


_TYPE_NAMES = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _is(value: Any, kind: type) -> bool:
    """TOML's value has ``kind`` (an int is a float too; a bool is no number)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


def _check(path: Path, section: str, table: dict[str, Any], types: dict[str, type] | None) -> None:
    """Raise ConfigError for an unknown key or a value of the wrong type (``types`` None: strings)."""
    for key, value in table.items():
        kind = str if types is None else types.get(key)
        if kind is None:
            raise ConfigError(f"{path}: unknown key {key!r} in [{section}]; known keys: {', '.join(types)}")
        if not _is(value, kind):
            raise ConfigError(f"{path}: [{section}] {key} = {value!r} must be {_TYPE_NAMES[kind]}")


def load_config(extra: Path | None = None) -> Config:
    """Merge the project's tokbench.toml, ./tokbench.toml and ``extra`` (later files win per key)."""
    if extra is not None and not Path(extra).is_file():
        raise ConfigError(f"config file {extra} does not exist; pass --config with an existing tokbench.toml")
    config = Config()
    candidates = [PACKAGE_CONFIG, Path.cwd() / "tokbench.toml"]
    if extra is not None:
        candidates.append(Path(extra))
    seen: set[Path] = set()
    for path in candidates:
        if not path.exists() or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        data = _read(path)
        for section, types in (("defaults", DEFAULT_TYPES), ("models", None), ("judge", JUDGE_TYPES)):
            value = data.get(section, {})
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            _check(path, section, value, types)
            getattr(config, section).update(value)
        config.sources.append(str(path))
    return config
