"""The ``shortgpt-serve cache`` commands: list and clear the cache."""

from __future__ import annotations

import datetime as dt
import time

import click

from shortgpt_serve import cache
from shortgpt_serve.config import CACHE
from shortgpt_serve.options import CONFIG_OPTION, BadSetting, Group, build_config, handle_errors, options
from shortgpt_serve.tables import text_table


@click.group(name="cache", cls=Group)
def cache_group() -> None:
    """List or clear the cache: converted models, profiles, full-model scores, checkpoints and benchmarks.

    Each entry is keyed by what determines it and verified before reuse; see the README's "Cache" section.
    """


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


@cache_group.command(name="list")
@CONFIG_OPTION
@options(CACHE)
@click.option(
    "--verify", is_flag=True, help="Read every byte of every entry against its manifest (slow on big models)."
)
@handle_errors
def cache_list(config_path: str | None, cache_dir: str | None, verify: bool) -> None:
    """Show the cache's entries: kind, key, size, last use and what each one is."""
    root = build_config(config_path, {"cache_dir": cache_dir}).resolved_cache_dir()
    found = cache.entries(root)
    if not found:
        click.echo(f"The cache {root} is empty.")
        return
    header = ["KIND", "KEY", "SIZE", "LAST USED", "WHAT"] + (["STATUS"] if verify else [])
    rows = []
    damaged = 0
    for e in found:
        busy = cache.held(root, e.kind, e.name) if e.kind in cache.KINDS and not e.leftover else None
        row = [e.kind, e.key, _human(e.size), _when(e.when), e.what + (f" [{busy}]" if busy else "")]
        if verify:
            problem = cache.verify(root, e)
            damaged += problem is not None
            row.append("ok" if problem is None else f"DAMAGED: {problem}")
        rows.append(row)
    click.echo(f"Cache: {root}")
    click.echo(text_table(header, rows, align="l" * len(header)))
    total = sum(e.size for e in found)
    click.echo(f"{len(found)} item(s), {_human(total)} in all.")
    if damaged:
        raise click.ClickException(
            f"{damaged} damaged item(s); the next run rebuilds them, or `shortgpt-serve cache clear` removes them."
        )


@cache_group.command(name="clear")
@CONFIG_OPTION
@options(CACHE)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice([*cache.KINDS, cache.HASHES]),
    help="Only entries of this kind (repeatable). Default: every kind.",
)
@click.option("--older-than", type=float, metavar="DAYS", help="Only entries last used more than DAYS days ago.")
@click.option("--yes", "-y", is_flag=True, help="Remove without asking.")
@handle_errors
def cache_clear(
    config_path: str | None, cache_dir: str | None, kinds: tuple[str, ...], older_than: float | None, yes: bool
) -> None:
    """Remove cache entries; an entry a running shortgpt-serve is writing or serving is kept."""
    root = build_config(config_path, {"cache_dir": cache_dir}).resolved_cache_dir()
    if older_than is not None and not older_than >= 0:
        raise BadSetting(f"--older-than must be a number of days >= 0, got {older_than}.")
    age = None if older_than is None else older_than * 86400
    chosen = cache.select(cache.entries(root), set(kinds) or None, age, time.time())
    if not chosen:
        click.echo(f"Nothing to clear in {root}.")
        return
    if not yes:
        click.confirm(f"Remove {len(chosen)} item(s), {_human(sum(e.size for e in chosen))}, from {root}?", abort=True)
    result = cache.clear(root, chosen)
    for e in result.removed:
        click.echo(f"Removed {e.kind}/{e.name} ({_human(e.size)})")
    click.echo(f"Freed {_human(result.freed)} in {root}.")
    if result.kept:
        for e, why in result.kept:
            click.echo(f"Kept {e.kind}/{e.name}: {why}")
        raise click.ClickException(
            f"{len(result.kept)} item(s) in use by a running shortgpt-serve were kept; stop it and clear again."
        )
