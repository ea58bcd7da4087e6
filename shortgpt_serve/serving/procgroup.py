"""A command run in a process group of its own, with a watchdog that takes the whole group down with the launcher.

The group is led by a tiny watchdog process that reads a pipe only the launcher can write to. When the launcher
dies, by any signal including SIGKILL, the kernel closes its end; the watchdog reads end of file, sends SIGTERM to
the group, and SIGKILL after a grace period. That reaches every process of the group, the command's own workers
included, whatever state they are in (a vLLM server still loading does not act on SIGTERM until it has started).
The watchdog ignores SIGTERM and SIGINT, so stopping the group with SIGTERM leaves it watching until the SIGKILL
that ends every stop.

Stopping waits for the whole group, not only the command's own process: on Linux, members are read from /proc
(zombies do not count); elsewhere only the command's process is waited for.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO

from shortgpt_serve.errors import ServeError

WATCHDOG_GRACE_S = 3.0
"""How long the group gets after the watchdog's SIGTERM before its SIGKILL."""
KILL_WAIT_S = 10.0
"""How long SIGKILLed members may take to be gone (their parents reap them)."""
POLL_S = 0.05

WATCHDOG = """\
import os, signal, sys, time
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
while True:
    try:
        if not os.read(0, 1):
            break
    except InterruptedError:
        continue
    except OSError:
        break
os.killpg(0, signal.SIGTERM)
time.sleep(float(sys.argv[1]))
os.killpg(0, signal.SIGKILL)
"""


def group_members(pgid: int, exclude: frozenset[int] = frozenset()) -> list[int] | None:
    """Pids of the live (not zombie) processes in group ``pgid``; None where /proc cannot tell."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    found = []
    for name in entries:
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            found.append(int(name))
    return found


@dataclass
class ProcessGroup:
    """The command's process (``process``) and the watchdog leading its group (``watchdog``, pid = group id)."""

    process: subprocess.Popen[bytes]
    watchdog: subprocess.Popen[bytes]
    guard: int
    """The write end of the watchdog's pipe; closing it (or dying) tells the watchdog to kill the group."""

    @property
    def pgid(self) -> int:
        return self.watchdog.pid

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def members(self) -> list[int]:
        """Live processes of the group other than the watchdog (just the command's, where /proc cannot tell)."""
        found = group_members(self.pgid, frozenset({self.watchdog.pid}))
        if found is None:
            return [] if self.process.poll() is not None else [self.process.pid]
        self.process.poll()  # reap the command's process if it is done, so it does not count as a member
        return [pid for pid in found if not (pid == self.process.pid and self.process.returncode is not None)]

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every member to exit; whether they all did."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None and not self.members():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)

    def kill(self) -> int:
        """SIGKILL the whole group (the watchdog with it), wait until it is gone; the command's exit code."""
        self.signal(signal.SIGKILL)
        self.wait(KILL_WAIT_S)
        code = self.process.wait()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.watchdog.wait(KILL_WAIT_S)
        with contextlib.suppress(OSError):
            os.close(self.guard)
        return code


def start_group(
    cmd: list[str],
    env: Mapping[str, str],
    output: IO[bytes] | None = None,
    grace: float = WATCHDOG_GRACE_S,
) -> ProcessGroup:
    """Start the watchdog, then ``cmd`` in the watchdog's process group (stdin closed; stdout and stderr to
    ``output``, or the launcher's own when None)."""
    read_end, guard = os.pipe()  # both non-inheritable: only the watchdog gets the read end, as its stdin
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-S", "-I", "-c", WATCHDOG, str(grace)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=os.setpgrp,
        )
    except OSError as exc:
        os.close(guard)
        raise ServeError(f"could not start the engine's watchdog process: {exc}") from exc
    finally:
        os.close(read_end)
    try:
        process = subprocess.Popen(
            cmd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
            preexec_fn=_join_group(watchdog.pid, os.getpid()),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(watchdog.pid, signal.SIGKILL)
        watchdog.wait()
        os.close(guard)
        raise ServeError(f"could not start {cmd[0]}: {exc}") from exc
    return ProcessGroup(process, watchdog, guard)


def _join_group(pgid: int, parent: int) -> Callable[[], None]:
    """A pre-exec hook that puts the command in the watchdog's group; a launcher that died before that point would
    leave it outside the watchdog's reach, so it exits instead."""

    def hook() -> None:
        os.setpgid(0, pgid)
        if os.getppid() != parent:
            os._exit(1)

    return hook
