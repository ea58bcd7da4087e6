"""The engine's process group and its watchdog, with real processes standing in for vLLM's server and workers
(the real engine runs in tests/test_serve.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from shortgpt_serve.serving.procgroup import WATCHDOG_GRACE_S, group_members, start_group
from shortgpt_serve.serving.serve import Engine

# A server that forks a worker, like vLLM's API server and its engine core. The leader exits at once on SIGTERM;
# the worker takes a second to shut down, then leaves a file saying it finished. With `ignore`, both ignore
# SIGTERM, like a vLLM server still loading.
SERVER = textwrap.dedent(
    """
    import os, signal, sys, time
    done, ready, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        def finish(signum, frame):
            time.sleep(1.0)
            open(done, "w").write("worker finished")
            os._exit(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore" else finish)
        open(ready, "w").write(str(os.getpid()))
        while True:
            time.sleep(1)
    while True:
        time.sleep(1)
    """
)


def wait_for_file(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_stop_waits_for_every_process_of_the_group(tmp_path: Path) -> None:
    """The leader is gone at once; stop still waits for its worker to finish its own shutdown."""
    done, ready = tmp_path / "done", tmp_path / "ready"
    group = start_group([sys.executable, "-c", SERVER, str(done), str(ready), "term"], os.environ)
    wait_for_file(ready)
    engine = Engine(group, "http://127.0.0.1:9", ready=True)
    start = time.monotonic()
    code = engine.stop(timeout=10)
    assert code == -signal.SIGTERM
    assert done.read_text() == "worker finished"  # it was allowed to finish, not SIGKILLed when the leader went
    assert 1.0 <= time.monotonic() - start < 5
    assert group_members(group.pgid) == []


def test_stop_kills_a_group_that_ignores_sigterm(tmp_path: Path) -> None:
    done, ready = tmp_path / "done", tmp_path / "ready"
    group = start_group([sys.executable, "-c", SERVER, str(done), str(ready), "ignore"], os.environ)
    wait_for_file(ready)
    engine = Engine(group, "http://127.0.0.1:9", ready=False)  # still loading: a short grace, then SIGKILL
    start = time.monotonic()
    assert engine.stop(timeout=20) == -signal.SIGKILL
    assert time.monotonic() - start < 8
    assert group_members(group.pgid) == [] and not done.exists()


LAUNCHER = textwrap.dedent(
    """
    import os, sys, time
    from shortgpt_serve.serving.procgroup import start_group
    group = start_group([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], os.environ)
    print(group.pgid, flush=True)
    time.sleep(600)
    """
)


def test_a_killed_launcher_takes_the_whole_group_with_it(tmp_path: Path) -> None:
    """SIGKILL to the launcher: the watchdog sees its pipe close and kills the group, even processes that
    ignore SIGTERM, within its grace period."""
    done, ready = tmp_path / "done", tmp_path / "ready"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, SERVER, str(done), str(ready), "ignore"], stdout=subprocess.PIPE
    )
    assert launcher.stdout is not None
    pgid = int(launcher.stdout.readline())
    wait_for_file(ready)
    members = group_members(pgid)
    assert members is not None and len(members) == 3  # the watchdog, the server and its worker
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + WATCHDOG_GRACE_S + 5
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(pgid) == []
