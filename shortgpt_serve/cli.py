"""The ``shortgpt-serve`` command: parse options, call the stages, turn their errors into one clear line."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from shortgpt_serve import cache
from shortgpt_serve.version import __version__
from shortgpt_serve.config import (
    BenchmarkConfig,
    CalibrationConfig,
    Config,
    ProfileConfig,
    QualityConfig,
    SelectionConfig,
    ServeConfig,
    dump_config,
    load_config,
    override,
)
from shortgpt_serve.errors import ConfigError, ShortGPTError

log = logging.getLogger("shortgpt_serve")


def _doc(cls: type, name: str) -> str:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = f.default if f.default is not dataclasses.MISSING else None
    text = f.metadata["help"]
    return f"{text} [default: {default}]" if default not in (None, (), False) else text


class DefaultGroup(click.Group):
    """A group that runs ``run`` when the first argument is not a command, so that
    ``shortgpt-serve --budget 0.75`` is the whole pipeline."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help", "--version")):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


class BadSetting(click.ClickException):
    """A bad flag, environment or config value: one line, exit code 2 like click's own usage errors."""

    exit_code = 2


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
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


TRUST_OPTION: tuple[str, Callable[[Any], Any]] = (
    "trust_remote_code",
    click.option(
        "--trust-remote-code",
        is_flag=True,
        default=None,
        show_envvar=True,
        envvar="SHORTGPT_SERVE_TRUST_REMOTE_CODE",
        help=_doc(Config, "trust_remote_code"),
    ),
)
# Options shared by the commands, each with the config key it sets. Defaults live in the config classes.
PIPELINE_OPTIONS: list[tuple[str, Callable[[Any], Any]]] = [
    (
        "model",
        click.option("--model", "-m", show_envvar=True, envvar="SHORTGPT_SERVE_MODEL", help=_doc(Config, "model")),
    ),
    (
        "budget",
        click.option(
            "--budget",
            "-b",
            type=float,
            show_envvar=True,
            envvar="SHORTGPT_SERVE_BUDGET",
            help=_doc(SelectionConfig, "budget"),
        ),
    ),
    (
        "min_quality",
        click.option(
            "--min-quality",
            "-q",
            type=float,
            show_envvar=True,
            envvar="SHORTGPT_SERVE_MIN_QUALITY",
            help=_doc(SelectionConfig, "min_quality"),
        ),
    ),
    ("strict", click.option("--strict/--no-strict", default=None, help=_doc(SelectionConfig, "strict"))),
    ("criterion", click.option("--criterion", help=_doc(SelectionConfig, "criterion"))),
    ("tasks", click.option("--tasks", help=_doc(QualityConfig, "tasks") + " Comma-separated.")),
    ("eval_limit", click.option("--eval-limit", type=int, help=_doc(QualityConfig, "limit"))),
    (
        "quality_enabled",
        click.option("--quality/--no-quality", "quality_enabled", default=None, help=_doc(QualityConfig, "enabled")),
    ),
    ("calibration_path", click.option("--calibration", "calibration_path", help=_doc(CalibrationConfig, "path"))),
    ("calibration_tokens", click.option("--calibration-tokens", type=int, help=_doc(CalibrationConfig, "num_tokens"))),
    ("seq_len", click.option("--seq-len", type=int, help=_doc(CalibrationConfig, "seq_len"))),
    ("batch_size", click.option("--batch-size", type=int, help=_doc(ProfileConfig, "batch_size"))),
    ("device", click.option("--device", help=_doc(ProfileConfig, "device"))),
    ("output", click.option("--output", "-o", help=_doc(Config, "output"))),
    ("overwrite", click.option("--overwrite", is_flag=True, default=None, help=_doc(Config, "overwrite"))),
    (
        "cache_dir",
        click.option(
            "--cache-dir", show_envvar=True, envvar="SHORTGPT_SERVE_CACHE_DIR", help=_doc(Config, "cache_dir")
        ),
    ),
    (
        "allow_pickle_weights",
        click.option(
            "--allow-pickle-weights",
            is_flag=True,
            default=None,
            show_envvar=True,
            envvar="SHORTGPT_SERVE_ALLOW_PICKLE_WEIGHTS",
            help=_doc(Config, "allow_pickle_weights"),
        ),
    ),
    TRUST_OPTION,
]
SERVE_OPTIONS: list[tuple[str, Callable[[Any], Any]]] = [
    ("host", click.option("--host", show_envvar=True, envvar="SHORTGPT_SERVE_HOST", help=_doc(ServeConfig, "host"))),
    (
        "port",
        click.option(
            "--port", "-p", type=int, show_envvar=True, envvar="SHORTGPT_SERVE_PORT", help=_doc(ServeConfig, "port")
        ),
    ),
    ("served_model_name", click.option("--served-model-name", help=_doc(ServeConfig, "served_model_name"))),
    (
        "api_key",
        click.option("--api-key", show_envvar=True, envvar="SHORTGPT_SERVE_API_KEY", help=_doc(ServeConfig, "api_key")),
    ),
    (
        "metrics_port",
        click.option(
            "--metrics-port",
            type=int,
            show_envvar=True,
            envvar="SHORTGPT_SERVE_METRICS_PORT",
            help=_doc(ServeConfig, "metrics_port"),
        ),
    ),
    (
        "max_restarts",
        click.option(
            "--max-restarts",
            type=int,
            show_envvar=True,
            envvar="SHORTGPT_SERVE_MAX_RESTARTS",
            help=_doc(ServeConfig, "max_restarts"),
        ),
    ),
    (
        "compare",
        click.option(
            "--compare",
            show_envvar=True,
            envvar="SHORTGPT_SERVE_COMPARE",
            help=_doc(BenchmarkConfig, "mode"),
        ),
    ),
    (
        "compare_concurrency",
        click.option(
            "--compare-concurrency",
            help=_doc(BenchmarkConfig, "concurrency") + " Comma-separated, e.g. 1,16.",
        ),
    ),
]
# Options that only matter once a depth is chosen; `profile` does not take them.
SELECTION_ONLY = {"budget", "output", "overwrite", "min_quality", "strict", "tasks", "eval_limit", "quality_enabled"}
CONFIG_OPTION = click.option(
    "--config",
    "-c",
    "config_path",
    show_envvar=True,
    envvar="SHORTGPT_SERVE_CONFIG",
    help="YAML file of settings (see deploy/shortgpt.yaml); flags and environment variables override it.",
)
# Flag name -> dotted config key.
KEYS = {
    "model": "model",
    "budget": "selection.budget",
    "min_quality": "selection.min_quality",
    "strict": "selection.strict",
    "criterion": "selection.criterion",
    "tasks": "quality.tasks",
    "eval_limit": "quality.limit",
    "quality_enabled": "quality.enabled",
    "calibration_path": "calibration.path",
    "calibration_tokens": "calibration.num_tokens",
    "seq_len": "calibration.seq_len",
    "batch_size": "profile.batch_size",
    "device": "profile.device",
    "output": "output",
    "overwrite": "overwrite",
    "cache_dir": "cache_dir",
    "allow_pickle_weights": "allow_pickle_weights",
    "trust_remote_code": "trust_remote_code",
    "host": "serve.host",
    "port": "serve.port",
    "served_model_name": "serve.served_model_name",
    "api_key": "serve.api_key",
    "metrics_port": "serve.metrics_port",
    "max_restarts": "serve.max_restarts",
    "compare": "benchmark.mode",
    "compare_concurrency": "benchmark.concurrency",
}


def _apply(options: list[tuple[str, Callable[[Any], Any]]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        for _name, opt in reversed(options):
            fn = opt(fn)
        return fn

    return decorator


def build_config(config_path: str | None, flags: dict[str, Any], vllm_args: tuple[str, ...] = ()) -> Config:
    """defaults < YAML < environment < flags (click has already resolved environment vs flags)."""
    config = load_config(config_path) if config_path else Config().validate()
    overrides = {KEYS[k]: v for k, v in flags.items() if k in KEYS}
    if isinstance(overrides.get("quality.tasks"), str):
        overrides["quality.tasks"] = tuple(t.strip() for t in overrides["quality.tasks"].split(",") if t.strip())
    if isinstance(overrides.get("benchmark.concurrency"), str):
        given = overrides["benchmark.concurrency"]
        levels = [c.strip() for c in given.split(",") if c.strip()]
        if not all(c.isdigit() for c in levels):
            raise ConfigError(
                f"--compare-concurrency must list positive integers, e.g. 1,16; got {given!r}.",
                param="--compare-concurrency",
            )
        overrides["benchmark.concurrency"] = tuple(int(c) for c in levels)
    if vllm_args:
        overrides["serve.vllm_args"] = (*config.serve.vllm_args, *vllm_args)
    return override(config, overrides)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[shortgpt-serve] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shortgpt-serve")
@click.option("--verbose", "-v", is_flag=True, help="Log more detail.")
def cli(verbose: bool) -> None:
    """Shorten an LLM by removing its least influential layers (ShortGPT) and serve it on vLLM.

    Without a command, runs `run`: `shortgpt-serve --budget 0.75` profiles, shortens, writes and serves.
    See `shortgpt-serve run --help` for its options.
    """
    _setup_logging(verbose)


@cli.command(name="run", context_settings={"ignore_unknown_options": False})
@CONFIG_OPTION
@_apply(PIPELINE_OPTIONS)
@_apply(SERVE_OPTIONS)
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
@_handle_errors
def run_command(config_path: str | None, vllm_args: tuple[str, ...], **flags: Any) -> None:
    """Profile, choose the depth, write the shortened checkpoint and serve it on vLLM.

    Arguments after `--` go to vLLM as they are, e.g. `-- --max-model-len 4096`.
    """
    from shortgpt_serve.pipeline import prepare
    from shortgpt_serve.serve import check_port_free

    config = build_config(config_path, flags, vllm_args)
    # Fail on a busy port now, not after minutes of profiling.
    check_port_free(config.serve.host, config.serve.port, "--port")
    if config.serve.metrics_port:
        check_port_free(config.serve.host, config.serve.metrics_port, "--metrics-port")
    with contextlib.ExitStack() as in_use:  # `cache clear` leaves the served checkpoint alone while this runs
        prepared = prepare(config, in_use=in_use)
        _print_choice(prepared)
        _serve(prepared.checkpoint, config, prepared.served_model_name, prepared.provenance, prepared.source.path)


@cli.command(name="profile")
@CONFIG_OPTION
@_apply([o for o in PIPELINE_OPTIONS if o[0] not in SELECTION_ONLY])
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the profile as JSON here.")
@_handle_errors
def profile_command(config_path: str | None, json_path: str | None, **flags: Any) -> None:
    """Measure every layer's Block Influence on calibration text and print the table."""
    from shortgpt_serve.pipeline import check_paths, read_calibration, resolve_source, run_profile

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
@_apply(PIPELINE_OPTIONS)
@_handle_errors
def prune_command(config_path: str | None, **flags: Any) -> None:
    """Profile, choose the depth and write the shortened checkpoint, without serving it."""
    from shortgpt_serve.pipeline import prepare

    config = build_config(config_path, flags)
    prepared = prepare(config)
    _print_choice(prepared)


@cli.command(name="serve")
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=Path))
@CONFIG_OPTION
@_apply(SERVE_OPTIONS)
@_apply([TRUST_OPTION])
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
@_handle_errors
def serve_command(checkpoint: Path, config_path: str | None, vllm_args: tuple[str, ...], **flags: Any) -> None:
    """Serve a checkpoint written by `prune` on vLLM, with the launcher's metrics."""
    from shortgpt_serve.checkpoint import verify_checkpoint
    from shortgpt_serve.errors import CheckpointError
    from shortgpt_serve.models import check_remote_code, read_config
    from shortgpt_serve.serve import check_port_free

    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint folder {checkpoint} does not exist; pass a folder written by `prune`.")
    config = build_config(config_path, flags, vllm_args)
    check_port_free(config.serve.host, config.serve.port, "--port")
    if config.serve.metrics_port:
        check_port_free(config.serve.host, config.serve.metrics_port, "--metrics-port")
    with contextlib.ExitStack() as in_use:
        cache_dir = config.resolved_cache_dir()
        entry = cache.entry_of(cache_dir, checkpoint)
        if entry is not None:  # a checkpoint in the cache: kept from `cache clear`, verified against the hash memo
            in_use.enter_context(cache.in_use(cache_dir, *entry))
            provenance = verify_checkpoint(checkpoint, cache.FileHashes(cache_dir).sha256)
        else:
            provenance = verify_checkpoint(checkpoint)
        check_remote_code(checkpoint, read_config(checkpoint), config.trust_remote_code)
        name = config.serve.served_model_name or provenance.get("served_model_name") or f"{checkpoint.name}"
        _serve(checkpoint, config, name, provenance, _full_model_of(provenance, config))


@cli.command(name="verify")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@_handle_errors
def verify_command(checkpoint: Path) -> None:
    """Check a shortened checkpoint's files against the sha256 sums in its shortgpt.json."""
    from shortgpt_serve.checkpoint import verify_checkpoint
    from shortgpt_serve.errors import CheckpointError

    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint} is not a folder; pass a checkpoint folder written by shortgpt-serve.")
    record = verify_checkpoint(checkpoint)
    src = record["source"]
    click.echo(
        f"OK: {len(record['files'])} files match; {src['name']} with layers {record['removed_layers']} removed "
        f"({src['num_layers'] - len(record['removed_layers'])} of {src['num_layers']} kept)."
    )


@cli.command(name="show-config")
@CONFIG_OPTION
@_apply(PIPELINE_OPTIONS)
@_apply(SERVE_OPTIONS)
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
@_handle_errors
def show_config_command(config_path: str | None, vllm_args: tuple[str, ...], **flags: Any) -> None:
    """Print the effective settings (defaults < YAML < environment < flags) as YAML."""
    config = build_config(config_path, flags, vllm_args)
    if config.serve.api_key:
        config = dataclasses.replace(config, serve=dataclasses.replace(config.serve, api_key="<set>"))
    click.echo(dump_config(config), nl=False)


# --- cache ------------------------------------------------------------------------------------------------------

CACHE_DIR_OPTION = click.option(
    "--cache-dir", show_envvar=True, envvar="SHORTGPT_SERVE_CACHE_DIR", help=_doc(Config, "cache_dir")
)


@cli.group(name="cache")
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


def _left_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@cache_group.command(name="list")
@CONFIG_OPTION
@CACHE_DIR_OPTION
@click.option(
    "--verify", is_flag=True, help="Read every byte of every entry against its manifest (slow on big models)."
)
@_handle_errors
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
    click.echo(_left_table(header, rows))
    total = sum(e.size for e in found)
    click.echo(f"{len(found)} item(s), {_human(total)} in all.")
    if damaged:
        raise click.ClickException(
            f"{damaged} damaged item(s); the next run rebuilds them, or `shortgpt-serve cache clear` removes them."
        )


@cache_group.command(name="clear")
@CONFIG_OPTION
@CACHE_DIR_OPTION
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice([*cache.KINDS, cache.HASHES]),
    help="Only entries of this kind (repeatable). Default: every kind.",
)
@click.option("--older-than", type=float, metavar="DAYS", help="Only entries last used more than DAYS days ago.")
@click.option("--yes", "-y", is_flag=True, help="Remove without asking.")
@_handle_errors
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


def _print_choice(prepared: Any) -> None:
    click.echo(prepared.profile.table(prepared.selection.removed), err=True)
    click.echo(f"\n{prepared.summary}\nCheckpoint: {prepared.checkpoint}", err=True)
    if not prepared.selection.latency_met:
        click.secho(
            "Warning: the latency budget was missed to keep the accuracy floor (see above).", fg="yellow", err=True
        )


def _full_model_of(provenance: dict[str, Any], config: Config) -> Path | None:
    """The folder of the model a checkpoint was cut from, for the comparison; None when it is not here."""
    from shortgpt_serve.models import resolve_model

    src = provenance["source"]
    origin = str(src.get("origin", ""))
    spec = None if origin.startswith("embedded default") else origin.removeprefix("hub:")
    try:
        source = resolve_model(
            spec,
            config.resolved_cache_dir(),
            allow_pickle_weights=config.allow_pickle_weights,
            trust_remote_code=config.trust_remote_code,
        )
    except ShortGPTError as exc:
        log.info("The full model (%s) is not available for the comparison: %s", origin, exc.message)
        return None
    if source.sha256 != src.get("sha256"):
        log.warning("The full model at %s has changed since the checkpoint was cut; not comparing with it", origin)
        return None
    return source.path


def _serve(
    checkpoint: Path, config: Config, name: str, provenance: dict[str, Any], full_model_dir: Path | None
) -> None:
    from shortgpt_serve.compare import Comparison, Stopped
    from shortgpt_serve.metrics import LauncherMetrics, start_metrics_server
    from shortgpt_serve.serve import Engine, engine_dist, local_url, serve, stop_on_signals

    cfg = config.serve
    metrics = LauncherMetrics()
    metrics.record_checkpoint(provenance)
    dist, version = engine_dist()
    metrics.record_build(dist, version, provenance, name)
    server = start_metrics_server(metrics, cfg.host, cfg.metrics_port) if cfg.metrics_port else None
    comparison = None
    trusted = config.trust_remote_code
    if config.benchmark.mode != "off":
        comparison = Comparison.plan(
            config.benchmark, cfg, config.resolved_cache_dir(), checkpoint, provenance, name, (dist, version)
        )

    def ready(engine: Engine, stop: threading.Event) -> None:
        where = f"{engine.base_url}/v1"
        extra = f"; launcher metrics at {local_url(cfg.host, cfg.metrics_port)}/metrics" if server else ""
        auth = " (API key required)" if cfg.api_key else ""
        click.echo(
            f"Serving {name} at {where}{auth} (OpenAI-compatible); vLLM metrics at {engine.base_url}/metrics{extra}. "
            "Ctrl-C stops.",
            err=True,
        )

    try:
        if comparison is not None:
            with stop_on_signals() as stop:
                for what, measure in (
                    ("full", lambda: comparison.measure_full(full_model_dir, stop, trust_remote_code=trusted)),
                    ("shortened", lambda: comparison.measure_shortened(checkpoint, stop, trust_remote_code=trusted)),
                ):
                    try:
                        measure()
                    except Stopped:
                        return
                    except ShortGPTError as exc:
                        log.error("Benchmark of the %s model failed; serving without it: %s", what, exc.message)
            if comparison.full and comparison.short:
                click.echo(f"\nFull vs shortened on {dist} {version}, same settings:\n{comparison.table()}\n", err=True)
            metrics.record_benchmark(comparison.full, comparison.short, comparison.predicted_cost)
        serve(
            checkpoint,
            cfg,
            name,
            on_ready=ready,
            on_health=lambda up: metrics.engine_up.set(1 if up else 0),
            on_restart=lambda code: metrics.engine_restarts.inc(),
            trust_remote_code=config.trust_remote_code,
        )
    finally:
        if server is not None:
            server.shutdown()


def _terminate(signum: int, frame: object) -> None:
    # Unwind like an exception, so temp folders are removed and nothing half-written stays behind.
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="shortgpt-serve")


if __name__ == "__main__":
    main()
