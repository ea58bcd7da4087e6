"""The config as a YAML file: read (unknown keys and wrong types are errors), written, overridden by key."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from shortgpt_serve.config.root import SECTIONS, Config
from shortgpt_serve.errors import ConfigError


def _coerce(cls: type, key: str, name: str, value: Any) -> Any:
    """Check one YAML value against the field's annotation; int is accepted where float is expected."""
    hints = typing.get_type_hints(cls)
    hint = hints[name]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"config key {key!r} must not be empty.", param=key)
    for typ in allowed:
        origin = typing.get_origin(typ)
        if origin is Literal:
            if value not in typing.get_args(typ):
                choices = ", ".join(typing.get_args(typ))
                raise ConfigError(f"config key {key!r} must be one of {choices}, got {value!r}.", param=key)
            return value
        if origin is tuple and isinstance(value, list | tuple):
            item = typing.get_args(typ)[0]
            if item is int:
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                    raise ConfigError(f"config key {key!r} must be a list of integers, got {value!r}.", param=key)
                return tuple(value)
            return tuple(str(v) for v in value)
        if typ is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ in (str, bool) and type(value) is typ:
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed if t is not type(None))
    raise ConfigError(f"config key {key!r} must be {names}, got {value!r}.", param=key)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(known))}.", param=key)
        if name in SECTIONS and cls is Config:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key!r} must be a mapping.", param=key)
            kwargs[name] = _build(SECTIONS[name], value, f"{key}.")
        else:
            kwargs[name] = _coerce(cls, key, name, value)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a plain mapping (e.g. parsed YAML)."""
    return _build(Config, data, "").validate()


def load_config(path: str | Path) -> Config:
    """Read a YAML config file. Unknown keys and wrong types are errors, not silently ignored."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; check --config.", param="--config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(
            f"config file {str(p)!r} is not valid YAML{where}; fix its syntax.", param="--config"
        ) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of settings.", param="--config")
    return config_from_dict(data)


def dump_config(config: Config) -> str:
    """The config as YAML; :func:`load_config` reads it back to an equal object."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def override(config: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted-key overrides (``{"serve.port": 9000}``); None values are skipped."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        if section:
            sections.setdefault(section, {})[name] = value
        else:
            top[name] = value
    for section, values in sections.items():
        top[section] = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(config, **top).validate()
