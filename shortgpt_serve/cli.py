"""The ``shortgpt-serve`` command: parse options, call the stages, turn their errors into one clear line.

The settings' flags are made from the config dataclasses (``shortgpt_serve.options``); serving is
``shortgpt_serve.serving.launch``; the cache commands are in ``shortgpt_serve.cli_cache``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from shortgpt_serve.cli_cache import cache_group
from shortgpt_serve.config import PROFILE, PRUNE, SERVE, dump_config
from shortgpt_serve.errors import CheckpointError
from shortgpt_serve.options import CONFIG_OPTION, Group, build_config, handle_errors, options
from shortgpt_serve.version import __version__

log = logging.getLogger("shortgpt_serve")


class DefaultGroup(Group):
    """A group that runs ``run`` when the first argument is not a command, so that
    ``shortgpt-serve --budget 0.75`` is the whole pipeline."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help", "--version")):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[shortgpt-serve] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shortgpt-serve")
@click.option("--verbose", "-v", is_flag=True, help="Log more detail.")
def cli(verbose: bool) -> None:
    """Shorten an LLM by removing its least influential layers (ShortGPT) and serve it on vLLM.

    Without a command, runs `run`: `shortgpt-serve --budget 0.75` profiles, shortens, writes and serves.
    See `shortgpt-serve run --help` for its options.
    """
    _setup_logging(verbose)


cli.add_command(cache_group)
VLLM_ARGS = click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)


@cli.command(name="run", context_settings={"ignore_unknown_options": False})
@CONFIG_OPTION
@options(PROFILE, PRUNE, SERVE)
@VLLM_ARGS
@handle_errors
def run_command(config_path: str | None, vllm_args: tuple[str, ...], **flags: Any) -> None:
    """Profile, choose the depth, write the shortened checkpoint and serve it on vLLM.

    Arguments after `--` go to vLLM as they are, e.g. `-- --max-model-len 4096`.
    """
    from shortgpt_serve.pipeline import prepare
    from shortgpt_serve.serving.launch import launch
    from shortgpt_serve.serving.serve import check_serve_ports

    config = build_config(config_path, flags, vllm_args)
    check_serve_ports(config.serve)  # a busy port fails now, not after minutes of profiling
    with contextlib.ExitStack() as in_use:  # `cache clear` leaves the served checkpoint alone while this runs
        prepared = prepare(config, in_use=in_use)
        _print_choice(prepared)
        launch(prepared.checkpoint, config, prepared.served_model_name, prepared.provenance, prepared.source.path, _say)


@cli.command(name="profile")
@CONFIG_OPTION
@options(PROFILE)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the profile as JSON here.")
@handle_errors
def profile_command(config_path: str | None, json_path: str | None, **flags: Any) -> None:
    """Measure every layer's Block Influence on calibration text and print the table."""
    from shortgpt_serve.inputs import check_paths, read_calibration, resolve_source
    from shortgpt_serve.session import run_profile

    config = build_config(config_path, flags)
    check_paths(config)
    docs = read_calibration(config)
    source = resolve_source(config)
    profile = run_profile(config, source, docs)
    click.echo(profile.table())
    click.echo(f"\n{profile.num_tokens} tokens of {profile.calibration_source}, {profile.seconds:.1f} s.")
    if json_path:
        profile.save(Path(json_path))
        click.echo(f"Wrote {json_path}")


@cli.command(name="prune")
@CONFIG_OPTION
@options(PROFILE, PRUNE)
@handle_errors
def prune_command(config_path: str | None, **flags: Any) -> None:
    """Profile, choose the depth and write the shortened checkpoint, without serving it."""
    from shortgpt_serve.pipeline import prepare

    config = build_config(config_path, flags)
    prepared = prepare(config)
    _print_choice(prepared)


@cli.command(name="serve")
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=Path))
@CONFIG_OPTION
@options(SERVE)
@VLLM_ARGS
@handle_errors
def serve_command(checkpoint: Path, config_path: str | None, vllm_args: tuple[str, ...], **flags: Any) -> None:
    """Serve a checkpoint written by `prune` on vLLM, with the launcher's metrics."""
    from shortgpt_serve.serving.launch import serve_checkpoint

    serve_checkpoint(checkpoint, build_config(config_path, flags, vllm_args), _say)


@cli.command(name="verify")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@handle_errors
def verify_command(checkpoint: Path) -> None:
    """Check a shortened checkpoint's files against the sha256 sums in its shortgpt.json."""
    from shortgpt_serve.checkpoint import verify_checkpoint

    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint} is not a folder; pass a checkpoint folder written by shortgpt-serve.")
    record = verify_checkpoint(checkpoint)
    removed = list(record.removed_layers)
    click.echo(
        f"OK: {len(record.files)} files match; {record.source.name} with layers {removed} removed "
        f"({record.num_kept} of {record.source.num_layers} kept)."
    )


@cli.command(name="show-config")
@CONFIG_OPTION
@options(PROFILE, PRUNE, SERVE)
@VLLM_ARGS
@handle_errors
def show_config_command(config_path: str | None, vllm_args: tuple[str, ...], **flags: Any) -> None:
    """Print the effective settings (defaults < YAML < environment < flags) as YAML."""
    config = build_config(config_path, flags, vllm_args)
    if config.serve.api_key:
        config = dataclasses.replace(config, serve=dataclasses.replace(config.serve, api_key="<set>"))
    click.echo(dump_config(config), nl=False)


def _print_choice(prepared: Any) -> None:
    click.echo(prepared.profile.table(prepared.selection.removed), err=True)
    click.echo(f"\n{prepared.summary}\nCheckpoint: {prepared.checkpoint}", err=True)
    if not prepared.selection.latency_met:
        click.secho(
            "Warning: the latency budget was missed to keep the accuracy floor (see above).", fg="yellow", err=True
        )


def _terminate(signum: int, frame: object) -> None:
    # Unwind like an exception, so temp folders are removed and nothing half-written stays behind.
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="shortgpt-serve")


if __name__ == "__main__":
    main()
