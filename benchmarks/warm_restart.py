"""Warm restart of `shortgpt-serve --budget 0.75` vs a plain vLLM boot of the same checkpoint.

    .venv/bin/python benchmarks/warm_restart.py [--repeats 3] [-- extra shortgpt-serve flags]

First runs the launcher once until it serves, so the cache holds the converted model, the profile, the full
model's scores, the checkpoint and the side-by-side benchmark. Then, `--repeats` rounds in alternation: start the
launcher again (a warm restart: everything reused after its integrity is checked) and time it until /health
answers and the launcher has announced the endpoint; start vLLM's OpenAI server by itself on the same checkpoint,
with the environment and arguments the launcher gives it, and time it until /health answers. Each is stopped
with SIGTERM before the next starts.
Target: warm restart <= plain boot + 5 s. Results are appended to benchmarks/results/warm_restart.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _record import record

ROOT = Path(__file__).resolve().parent.parent


def wait_health(proc: subprocess.Popen[bytes], port: int, timeout: float = 900, log: Path | None = None) -> float:
    """Seconds until /health answers 200 and, for the launcher (``log``), until it has announced the endpoint."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"process exited with {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200 and (log is None or "\nServing " in log.read_text(errors="replace")):
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"no /health within {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    from shortgpt_serve.serving.serve import free_loopback_port

    return free_loopback_port()


def launcher(extra: list[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [str(ROOT / ".venv/bin/shortgpt-serve"), "--budget", "0.75", "--port", str(port), "--metrics-port", "0"]
    with open(log, "wb") as f:
        proc = subprocess.Popen([*cmd, *extra], stdout=f, stderr=subprocess.STDOUT)
    return proc, port


def plain_vllm(checkpoint: Path, name: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    from shortgpt_serve.config import ServeConfig
    from shortgpt_serve.serving.serve import engine_dist, vllm_command

    port = free_port()
    cmd = vllm_command(checkpoint, ServeConfig(port=port), name, engine_dist()[0])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # what the launcher sets on vLLM-CPU
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, port


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    log = Path(tempfile.mkdtemp(prefix="warm-restart-"))
    first_log = log / "first.log"
    proc, port = launcher(extra, first_log)
    first = wait_health(proc, port, timeout=3600, log=first_log)
    stop(proc)
    text = first_log.read_text()
    checkpoint = Path(next(line for line in text.splitlines() if line.startswith("Checkpoint: ")).split(": ", 1)[1])
    name = next(line for line in text.splitlines() if line.startswith("Serving ")).split()[1]

    warm, plain = [], []
    for i in range(args.repeats):
        proc, port = launcher(extra, log / f"warm-{i}.log")
        warm.append(wait_health(proc, port, log=log / f"warm-{i}.log"))
        stop(proc)
        proc, port = plain_vllm(checkpoint, name, log / f"plain-{i}.log")
        plain.append(wait_health(proc, port))
        stop(proc)
    w, b = statistics.median(warm), statistics.median(plain)
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M')} — warm restart vs plain vLLM boot, {args.repeats} rounds",
        "",
        f"- first start (filling the cache, or reusing what it had): {first:.1f} s",
        f"- warm restart to /health: {', '.join(f'{x:.1f}' for x in warm)} s (median {w:.1f} s)",
        f"- plain vLLM boot of {checkpoint.name} to /health: {', '.join(f'{x:.1f}' for x in plain)} s "
        f"(median {b:.1f} s)",
        f"- **warm restart - plain boot: {w - b:+.1f} s** (target <= +5 s: {'met' if w - b <= 5 else 'MISSED'})",
        f"- command: `.venv/bin/python benchmarks/warm_restart.py {' '.join(argv)}`",
        "",
    ]
    record("warm_restart", lines)


if __name__ == "__main__":
    main()
