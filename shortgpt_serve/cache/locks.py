"""Entry locks: ``flock`` locks the kernel drops when their process dies, so a killed launcher leaves none.

``locks/<kind>/<entry>.lock`` is held exclusively while an entry is checked, computed or removed;
``locks/<kind>/<entry>.use`` is held shared while a launcher serves from the entry.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from shortgpt_serve.cache.failures import writing
from shortgpt_serve.cache.layout import KINDS, LOCKS
from shortgpt_serve.cache.removal import remove_leftovers

log = logging.getLogger(__name__)

BUSY = ((".lock", "being written or checked"), (".use", "in use"))
"""Each lock file's suffix and what its holder is doing with the entry."""


def lock_path(cache_dir: Path, kind: str, name: str, suffix: str = ".lock") -> Path:
    return cache_dir / LOCKS / kind / f"{name}{suffix}"


def _open_lock(cache_dir: Path, path: Path) -> int:
    with writing(cache_dir):
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            with suppress(FileNotFoundError):  # another launcher tidied the empty folder away just now
                return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def acquire(cache_dir: Path, path: Path, mode: int, waiting: str | None = None) -> int | None:
    """A descriptor of ``path`` holding a ``mode`` flock; None if ``waiting`` is None and someone else holds it.

    Lock files are removed with the entries they guard, by a holder of the lock; whoever was waiting on the
    removed file then finds it gone and locks the new one instead.
    """
    logged = False
    while True:
        fd = _open_lock(cache_dir, path)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting is None:
                    os.close(fd)
                    return None
                if not logged:
                    log.info("waiting for another shortgpt-serve to finish %s", waiting)
                    logged = True
                fcntl.flock(fd, mode)
            st = os.fstat(fd)
            with suppress(FileNotFoundError):
                now = os.stat(path)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def forget(cache_dir: Path, kind: str, name: str) -> None:
    """Remove an absent entry's lock files and the folders left empty (hold its lock): a failed or refused run
    leaves the cache as it found it."""
    for suffix, _ in BUSY:
        lock_path(cache_dir, kind, name, suffix).unlink(missing_ok=True)
    for folder in (cache_dir / LOCKS / kind, cache_dir / LOCKS, cache_dir / kind):
        with suppress(OSError):
            folder.rmdir()


@contextmanager
def lock(cache_dir: Path, kind: str, name: str) -> Iterator[None]:
    """Hold an entry's lock while checking, computing or removing it; waits for another launcher holding it.

    Once held, temp folders the entry's earlier writers left behind (a killed process) are removed: a writer
    holds this lock for as long as its temp folder exists. The lock file's mtime records when the entry was
    last used.
    """
    created = [d for d in (cache_dir, *cache_dir.parents) if not d.exists()]
    path = lock_path(cache_dir, kind, name)
    fd = acquire(cache_dir, path, fcntl.LOCK_EX, waiting=f"{kind}/{name}")
    assert fd is not None
    try:
        with writing(cache_dir):
            os.utime(fd)
        remove_leftovers(cache_dir / kind, name)
        yield
    finally:
        if not (cache_dir / kind / name).exists():
            forget(cache_dir, kind, name)
            for folder in created:  # deepest first, each only if still empty
                with suppress(OSError):
                    folder.rmdir()
        os.close(fd)


@contextmanager
def in_use(cache_dir: Path, kind: str, name: str) -> Iterator[None]:
    """Mark an entry as in use (a shared lock) so that ``cache clear`` leaves it alone while this is held."""
    fd = acquire(cache_dir, lock_path(cache_dir, kind, name, ".use"), fcntl.LOCK_SH, waiting=f"{kind}/{name}")
    assert fd is not None
    try:
        yield
    finally:
        os.close(fd)


def entry_of(cache_dir: Path, path: Path) -> tuple[str, str] | None:
    """(kind, name) when ``path`` is an entry folder of this cache, else None."""
    try:
        parent = path.resolve().parent
        root = cache_dir.resolve()
    except OSError:
        return None
    if parent.parent == root and parent.name in KINDS:
        return parent.name, path.resolve().name
    return None


def held(cache_dir: Path, kind: str, name: str) -> str | None:
    """Why the entry is busy ("being written", "in use") or None; creates nothing."""
    for suffix, why in BUSY:
        try:
            fd = os.open(lock_path(cache_dir, kind, name, suffix), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return why
        finally:
            os.close(fd)
    return None
