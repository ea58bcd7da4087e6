"""Before a GPU engine boots: enough GPUs for its tensor parallelism, and enough free memory on each for its share.

vLLM takes ``--gpu-memory-utilization`` (0.92 in the pinned release) of each GPU's *total* memory and refuses to
start when less than that is free, after minutes of loading. Checked first here from ``nvidia-smi`` (the launcher
itself never touches CUDA, so it holds no GPU memory), with what holds the memory named in the error. Where
``nvidia-smi`` is absent (CPU engines, other accelerators) nothing is checked.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from shortgpt_serve.errors import ServeError

DEFAULT_UTILIZATION = 0.92
"""vLLM's default ``--gpu-memory-utilization`` in the release the ``gpu`` extra pins."""
MIB = 2**20


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    free: int
    total: int


@dataclass(frozen=True)
class Holder:
    gpu_uuid: str
    pid: int
    name: str
    used: int


def vllm_flag(args: Sequence[str], *names: str) -> str | None:
    """The value of a vLLM flag among the passed-through arguments (``--flag v`` or ``--flag=v``), last one wins."""
    value = None
    for i, arg in enumerate(args):
        flag, eq, rest = arg.partition("=")
        if flag in names:
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def parse_gpus(text: str) -> list[Gpu]:
    """``nvidia-smi --query-gpu=index,uuid,memory.free,memory.total --format=csv,noheader,nounits`` (MiB)."""
    out = []
    for line in text.strip().splitlines():
        index, uuid, free, total = (p.strip() for p in line.split(","))
        out.append(Gpu(int(index), uuid, int(float(free)) * MIB, int(float(total)) * MIB))
    return out


def parse_holders(text: str) -> list[Holder]:
    """``nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv,noheader,nounits``."""
    out = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[1].isdigit():
            used = int(float(parts[3])) * MIB if parts[3].replace(".", "", 1).isdigit() else 0
            out.append(Holder(parts[0], int(parts[1]), os.path.basename(parts[2]), used))
    return out


def visible(gpus: list[Gpu], cuda_visible: str | None) -> list[Gpu]:
    """The GPUs a process started with ``CUDA_VISIBLE_DEVICES=cuda_visible`` sees, in its order."""
    if cuda_visible is None:
        return gpus
    picked = []
    for item in (x.strip() for x in cuda_visible.split(",") if x.strip()):
        match = [g for g in gpus if (item.isdigit() and g.index == int(item)) or g.uuid.startswith(item)]
        if not match:
            break  # CUDA stops at the first entry it cannot resolve
        picked.append(match[0])
    return picked


def check(gpus: list[Gpu], holders: list[Holder], vllm_args: Sequence[str], cuda_visible: str | None) -> None:
    """Raise :class:`ServeError` (one line) when the engine could not start on these GPUs."""
    seen = visible(gpus, cuda_visible)
    tp = int(vllm_flag(vllm_args, "--tensor-parallel-size", "-tp") or 1)
    where = f" (CUDA_VISIBLE_DEVICES={cuda_visible})" if cuda_visible is not None else ""
    if tp > len(seen):
        raise ServeError(
            f"--tensor-parallel-size {tp} needs {tp} GPUs on this node but {len(seen)} are visible{where}; "
            f"lower it after -- (e.g. -- --tensor-parallel-size {max(1, len(seen))}) or make more GPUs visible."
        )
    share = float(vllm_flag(vllm_args, "--gpu-memory-utilization") or DEFAULT_UTILIZATION)
    for gpu in seen[:tp]:
        want = share * gpu.total
        if gpu.free >= want:
            continue
        held = sorted((h for h in holders if h.gpu_uuid == gpu.uuid), key=lambda h: -h.used)
        by = ", ".join(f"pid {h.pid} ({h.name}, {h.used / 2**30:.1f} GiB)" for h in held[:3]) or "no process listed"
        fits = max(0.01, math.floor((gpu.free / gpu.total - 0.02) * 100) / 100)  # a little under what is free
        raise ServeError(
            f"GPU {gpu.index} has {gpu.free / 2**30:.1f} GiB free of {gpu.total / 2**30:.1f} GiB, but vLLM takes "
            f"{share:.0%} of it ({want / 2**30:.1f} GiB, --gpu-memory-utilization {share}); held by {by}. Stop what "
            f"holds it, or give vLLM a smaller share after -- (e.g. -- --gpu-memory-utilization {fits:.2f})."
        )


def check_before_boot(vllm_args: Sequence[str], env: dict[str, str] | None = None) -> None:
    """:func:`check` on this machine's GPUs as ``nvidia-smi`` reports them; nothing when it is absent or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return
    env = dict(os.environ) if env is None else env

    def query(arg: str, fields: str) -> str | None:
        try:
            res = subprocess.run(
                [smi, f"--query-{arg}={fields}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout if res.returncode == 0 else None

    gpus = query("gpu", "index,uuid,memory.free,memory.total")
    if not gpus:
        return
    holders = query("compute-apps", "gpu_uuid,pid,process_name,used_memory") or ""
    check(parse_gpus(gpus), parse_holders(holders), vllm_args, env.get("CUDA_VISIBLE_DEVICES"))
