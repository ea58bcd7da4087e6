"""How a setting is declared: its help text and flag in the field metadata, and the checks the sections share."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from shortgpt_serve.errors import ConfigError

# Literal aliases: the CLI offers their values as choices, and YAML values are checked against them.
Criterion = Literal["bi", "angular", "iterative-bi"]
CompareMode = Literal["auto", "reuse", "measure", "off"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
HealMethod = Literal["none", "linear", "distill"]
HealObjective = Literal["squared", "relative"]
Decide = Literal["fit", "lower-bound", "point"]
CRITERIA: tuple[str, ...] = typing.get_args(Criterion)
COMPARE_MODES: tuple[str, ...] = typing.get_args(CompareMode)
DTYPES: tuple[str, ...] = typing.get_args(Dtype)
ENV_PREFIX = "SHORTGPT_SERVE_"
# Which commands take a setting's flag, by the smallest command that does: `profile` settings are taken by
# profile, prune, run and show-config; `prune` ones by all of those but profile; `serve` ones by serve, run and
# show-config; `cache` ones by the cache commands.
PROFILE, PRUNE, SERVE, CACHE = "profile", "prune", "serve", "cache"


@dataclass(frozen=True)
class Flag:
    """How a setting is given on the command line."""

    decls: tuple[str, ...]
    """Click declarations: ``("--budget", "-b")``, or ``("--strict/--no-strict",)`` for an on/off pair."""
    on: frozenset[str]
    """The command groups that take it (PROFILE, PRUNE, SERVE, CACHE)."""
    envvar: str | None = None
    suffix: str = ""
    """Help text the flag adds to the field's (e.g. how a list is written)."""


def setting(
    text: str,
    *decls: str,
    on: tuple[str, ...] = (PROFILE,),
    env: str | None = None,
    suffix: str = "",
    **kw: Any,
) -> Any:
    """A field with its help text and, when ``decls`` are given, its flag (``env``: the environment variable's
    name after SHORTGPT_SERVE_)."""
    meta: dict[str, Any] = {"help": text}
    if decls:
        meta["flag"] = Flag(decls, frozenset(on), ENV_PREFIX + env if env else None, suffix)
    return field(metadata=meta, **kw)


def flag_name(cls: type, name: str, key: str) -> str:
    """What an error about a field names: its flag when it has one, else its config key."""
    flag = {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("flag")
    return flag.decls[0].split("/")[0] if flag else key


def check_choices(obj: Any, prefix: str) -> None:
    """Literal-typed fields hold one of their values (the CLI checks its own; this catches library callers)."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        if typing.get_origin(hint) is Literal and getattr(obj, name) not in typing.get_args(hint):
            flag = flag_name(type(obj), name, f"{prefix}.{name}")
            raise ConfigError(
                f"{flag} must be one of {', '.join(typing.get_args(hint))}, got {getattr(obj, name)!r}.", param=flag
            )


def not_blank(value: str | None, flag: str, fix: str) -> None:
    if value is not None and not value.strip():
        raise ConfigError(f"{flag} is empty; {fix}.", param=flag)


def positive(key: str, value: int, flag: str) -> None:
    if value <= 0:
        raise ConfigError(f"{flag} must be a positive integer, got {value}.", param=flag)
