"""Serve a shortened checkpoint the way the launcher does: comparison with the full model, metrics, supervised engine.

:func:`launch` is what `run` and `serve` end with; :func:`serve_checkpoint` is all of `serve` (verify the folder,
then launch). Messages for the person at the terminal go to ``say`` (stderr by default); the rest is logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from shortgpt_serve.config import Config
from shortgpt_serve.errors import CheckpointError, ShortGPTError
from shortgpt_serve.provenance import Provenance

log = logging.getLogger("shortgpt_serve")

Say = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def full_model_of(provenance: Provenance, config: Config) -> Path | None:
    """The folder of the model a checkpoint was cut from, for the comparison; None when it is not here."""
    from shortgpt_serve.models.source import resolve_model

    origin = provenance.source.origin
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
    if source.sha256 != provenance.source.sha256:
        log.warning("The full model at %s has changed since the checkpoint was cut; not comparing with it", origin)
        return None
    return source.path


def launch(
    checkpoint: Path,
    config: Config,
    name: str,
    provenance: Provenance,
    full_model_dir: Path | None,
    say: Say = _stderr,
) -> None:
    """Publish the launcher metrics, compare the full and the shortened model (``config.benchmark``), then serve
    ``checkpoint`` as ``name`` until SIGTERM/SIGINT, restarting the engine if it dies. With ``serve.shadow_url``
    the engine compares live requests with the full model itself (serving/shadow.py; ``shortgpt_live_*`` on
    vLLM's /metrics); the benchmark engines never do."""
    from shortgpt_serve.models.source import read_config
    from shortgpt_serve.serving.compare import Comparison
    from shortgpt_serve.serving.context import served_context
    from shortgpt_serve.serving.metrics import LauncherMetrics, start_metrics_server
    from shortgpt_serve.serving.serve import Engine, engine_dist, local_url, serve, stop_on_signals
    from shortgpt_serve.serving.shadow import redact
    from shortgpt_serve.serving.workload import Stopped

    cfg = config.serve
    metrics = LauncherMetrics()
    metrics.record_checkpoint(provenance)
    dist, version = engine_dist()
    metrics.record_build(dist, version, provenance, name)
    context = served_context(read_config(checkpoint), cfg.vllm_args)
    metrics.record_context(context)
    warning = context.warning()  # the build's plan line already stated the bound; said again only when it matters
    if warning is not None:
        log.warning("%s", warning)
    server = start_metrics_server(metrics, cfg.host, cfg.metrics_port) if cfg.metrics_port else None
    trusted = config.trust_remote_code
    comparison = None
    if config.benchmark.mode != "off":
        private = dataclasses.replace(cfg, shadow_url=None)
        comparison = Comparison.plan(
            config.benchmark, private, config.resolved_cache_dir(), checkpoint, provenance, name, (dist, version)
        )

    def ready(engine: Engine, stop: threading.Event) -> None:
        extra = f"; launcher metrics at {local_url(cfg.host, cfg.metrics_port)}/metrics" if server else ""
        auth = " (API key required)" if cfg.api_key else ""
        base = engine.base_url
        shadow = ""
        if cfg.shadow_url:
            shadow = f"; {cfg.shadow_fraction:.0%} of completions also sent to {redact(cfg.shadow_url)} to compare"
        say(
            f"Serving {name} at {base}/v1{auth} (OpenAI-compatible); vLLM metrics at "
            f"{base}/metrics{extra}{shadow}. Ctrl-C stops."
        )

    def health(up: bool) -> None:
        metrics.engine_up.set(1 if up else 0)

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
                say(f"\nFull vs shortened on {dist} {version}, same settings:\n{comparison.table()}\n")
            metrics.record_benchmark(comparison.full, comparison.short, comparison.predicted_cost)
        serve(
            checkpoint,
            cfg,
            name,
            on_ready=ready,
            on_health=health,
            on_restart=lambda code: metrics.engine_restarts.inc(),
            trust_remote_code=trusted,
        )
    finally:
        if server is not None:
            server.shutdown()


def serve_checkpoint(checkpoint: Path, config: Config, say: Say = _stderr) -> None:
    """Verify a checkpoint written by `prune` (against the cache's hash memo when it is a cache entry, which is
    then kept from `cache clear` while it is served), check its code may run, and :func:`launch` it."""
    from shortgpt_serve import cache
    from shortgpt_serve.checkpoint import verify_checkpoint
    from shortgpt_serve.models.source import check_remote_code, read_config
    from shortgpt_serve.serving.serve import check_serve_ports

    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint folder {checkpoint} does not exist; pass a folder written by `prune`.")
    check_serve_ports(config.serve)
    with contextlib.ExitStack() as in_use:
        cache_dir = config.resolved_cache_dir()
        entry = cache.entry_of(cache_dir, checkpoint)
        if entry is not None:
            in_use.enter_context(cache.in_use(cache_dir, *entry))
            provenance = verify_checkpoint(checkpoint, cache.FileHashes(cache_dir).sha256)
        else:
            provenance = verify_checkpoint(checkpoint)
        check_remote_code(checkpoint, read_config(checkpoint), config.trust_remote_code)
        name = config.serve.served_model_name or provenance.served_model_name or checkpoint.name
        launch(checkpoint, config, name, provenance, full_model_of(provenance, config), say)
