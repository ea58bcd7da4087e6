"""Click options made from the config dataclasses' fields, the effective config from what the user gave, and the
click plumbing the command modules share (one-line errors).

Each setting with a :class:`~shortgpt_serve.config.Flag` in its field metadata becomes one option: the type from
the annotation (``click.Choice`` for ``Literal``), the help from the field's text and default, the environment
variable and the commands that take it from the flag. Option defaults are None, so an unset flag leaves the YAML
or the dataclass default in place.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import click

from shortgpt_serve.config import SECTIONS, Config, Flag, load_config, override
from shortgpt_serve.errors import ConfigError, ShortGPTError


@dataclass(frozen=True)
class Setting:
    """One config field that has a flag."""

    key: str
    """Dotted config key, e.g. ``selection.budget``."""
    param: str
    """The click parameter name: the key with ``_`` for ``.``."""
    hint: Any
    field: dataclasses.Field[Any]

    @property
    def flag(self) -> Flag:
        return typing.cast(Flag, self.field.metadata["flag"])

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.hint) is tuple


def _settings() -> list[Setting]:
    found = []
    for prefix, cls in [("", Config), *((f"{name}.", cls) for name, cls in SECTIONS.items())]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "flag" in f.metadata:
                key = prefix + f.name
                found.append(Setting(key, key.replace(".", "_"), _plain(hints[f.name]), f))
    return found


def _plain(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


SETTINGS = _settings()
BY_PARAM = {s.param: s for s in SETTINGS}


def _default_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def help_text(s: Setting) -> str:
    parts = [s.field.metadata["help"], s.flag.suffix]
    default = s.field.default
    if default is not dataclasses.MISSING and default not in (None, (), False):
        parts.append(f"[default: {_default_text(default)}]")
    return " ".join(p for p in parts if p)


def _option(s: Setting) -> Callable[[Any], Any]:
    kwargs: dict[str, Any] = {"default": None, "help": help_text(s)}
    if s.flag.envvar:
        kwargs.update(envvar=s.flag.envvar, show_envvar=True)
    if s.hint is bool:
        if not any("/" in d for d in s.flag.decls):  # an on/off pair is a flag already
            kwargs["is_flag"] = True
    elif typing.get_origin(s.hint) is Literal:
        kwargs["type"] = click.Choice(typing.get_args(s.hint))
    elif s.hint in (int, float):
        kwargs["type"] = s.hint
    return click.option(*s.flag.decls, s.param, **kwargs)


def options(*groups: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with the options of every setting taken by any of ``groups`` (config.PROFILE ...)."""
    chosen = [s for s in SETTINGS if s.flag.on & set(groups)]

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        for s in reversed(chosen):
            fn = _option(s)(fn)
        return fn

    return decorator


def _split(s: Setting, given: str) -> tuple[Any, ...]:
    items = [v.strip() for v in given.split(",") if v.strip()]
    if typing.get_args(s.hint)[0] is not int:
        return tuple(items)
    if not all(v.isdigit() for v in items):
        flag = s.flag.decls[0]
        raise ConfigError(f"{flag} must list positive integers, e.g. 1,16; got {given!r}.", param=flag)
    return tuple(int(v) for v in items)


def build_config(config_path: str | None, flags: dict[str, Any], vllm_args: tuple[str, ...] = ()) -> Config:
    """defaults < YAML < environment < flags (click has already resolved environment vs flags).

    ``flags``: click parameter values by name; names that are not settings are ignored."""
    config = load_config(config_path) if config_path else Config().validate()
    overrides: dict[str, Any] = {}
    for name, value in flags.items():
        s = BY_PARAM.get(name)
        if s is not None and value is not None:
            overrides[s.key] = _split(s, value) if s.is_list and isinstance(value, str) else value
    if vllm_args:
        overrides["serve.vllm_args"] = (*config.serve.vllm_args, *vllm_args)
    return override(config, overrides)


CONFIG_OPTION = click.option(
    "--config",
    "-c",
    "config_path",
    show_envvar=True,
    envvar="SHORTGPT_SERVE_CONFIG",
    help="YAML file of settings (see deploy/shortgpt.yaml); flags and environment variables override it.",
)


class BadSetting(click.ClickException):
    """A bad flag, environment or config value: one line, exit code 2 like click's own usage errors."""

    exit_code = 2


class Group(click.Group):
    """A group whose commands report a bad option value (click's type and choice checks) as one line, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.BadParameter as exc:
            raise BadSetting(exc.format_message()) from None


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Library errors become one line and a non-zero exit; no traceback for something the user can fix."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            raise BadSetting(exc.message) from None
        except ShortGPTError as exc:
            raise click.ClickException(exc.message) from None
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing half-written was kept.", err=True)
            sys.exit(130)

    return wrapper
