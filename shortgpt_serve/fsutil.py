"""Write files and folders so that a reader sees either nothing or the complete result."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from shortgpt_serve.errors import CheckpointError

A = TypeVar("A")
R = TypeVar("R")


def check_output_free(output: str | Path, *, overwrite: bool) -> None:
    """Refuse an ``--output`` folder that already exists unless the user passed ``--overwrite``."""
    if not overwrite and Path(output).expanduser().exists():
        raise CheckpointError(f"output folder {output} already exists; pass --overwrite or choose another --output.")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside ``target``; on success it becomes ``target`` in one rename.

    On any error (or interrupt) the temp folder is removed and ``target`` is left as it was. With
    ``overwrite`` an existing ``target`` is replaced only after the new folder is complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if target.exists():
            if not overwrite:
                raise FileExistsError(target)
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "x")
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The file's sha256, read through one reused ``chunk``-byte buffer (memory stays at one chunk)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def map_threads(fn: Callable[[A], R], items: Sequence[A], threads: int) -> list[R]:
    """``[fn(x) for x in items]``, on up to ``threads`` threads, started in the order given.

    For work that releases the GIL (sha256 of large buffers, copies in the kernel). The first error is raised once
    every call already running has returned; calls not yet started are skipped.
    """
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        futures = [pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
