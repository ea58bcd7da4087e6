"""``cache list`` and ``cache clear``: what the cache holds, whether it checks out, and removing parts of it."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import shutil
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shortgpt_serve.cache.failures import writing
from shortgpt_serve.cache.layout import HASHES, HUB, KINDS, LEFTOVER
from shortgpt_serve.cache.locks import BUSY, acquire, forget, lock_path
from shortgpt_serve.cache.manifest import check, read_manifest
from shortgpt_serve.cache.removal import delete, discard
from shortgpt_serve.fsutil import sha256_file


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    path: Path
    key: str
    """Prefix of the key's sha256, or '-' where there is none."""
    size: int
    created: float | None
    last_used: float | None
    what: str
    leftover: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def when(self) -> float | None:
        return self.last_used or self.created


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for p in path.rglob("*"):
        with suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def _timestamp(iso: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def entries(cache_dir: Path) -> list[Entry]:
    """Every entry, leftover temp folder and unrecognised item under the kinds' folders, and the hash memo."""
    out: list[Entry] = []
    for kind in KINDS:
        folder = cache_dir / kind
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            m = LEFTOVER.match(p.name)
            if m:
                out.append(
                    Entry(kind, m["name"], p, "-", _size(p), _mtime(p), None, "leftover of an interrupted write", True)
                )
                continue
            try:
                man = read_manifest(p)
                key = str(man.get("key_sha256") or "-")[:12]
                what = str(man.get("describe") or "") or "-"
                created = _timestamp(man.get("created"))
            except (OSError, ValueError):
                key, what, created = "-", "not a cache entry (no readable manifest; an older version's?)", _mtime(p)
            last = _mtime(lock_path(cache_dir, kind, p.name))
            out.append(Entry(kind, p.name, p, key, _size(p), created, last, what))
    memo = cache_dir / HASHES
    if memo.is_dir():
        n = sum(1 for _ in memo.glob("*.json"))
        out.append(Entry(HASHES, HASHES, memo, "-", _size(memo), _mtime(memo), None, f"file hash memo ({n} files)"))
    hub = cache_dir / HUB
    if hub.is_dir():
        what = "hub downloads (huggingface_hub manages them; not cleared here)"
        out.append(Entry(HUB, HUB, hub, "-", _size(hub), _mtime(hub), None, what))
    return out


def verify(cache_dir: Path, entry: Entry) -> str | None:
    """Read every byte of an entry against its manifest; the problem, or None."""
    if entry.leftover:
        return "half-written"
    if entry.kind not in KINDS:
        return None
    return check(entry.path, None, sha256_file)


@dataclass
class Cleared:
    removed: list[Entry] = field(default_factory=list)
    kept: list[tuple[Entry, str]] = field(default_factory=list)

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.removed)


def select(found: list[Entry], kinds: set[str] | None, older_than_s: float | None, now: float) -> list[Entry]:
    """The entries ``cache clear`` would remove (hub downloads never)."""
    chosen = []
    for e in found:
        if e.kind == HUB or (kinds and e.kind not in kinds):
            continue
        if older_than_s is not None and (e.when is None or now - e.when < older_than_s):
            continue
        chosen.append(e)
    return chosen


def clear(cache_dir: Path, chosen: list[Entry]) -> Cleared:
    """Remove the chosen entries; one that a running launcher holds (writing or serving it) is kept."""
    result = Cleared()
    for e in chosen:
        if e.kind == HASHES:
            with writing(cache_dir):
                shutil.rmtree(e.path, ignore_errors=True)
            result.removed.append(e)
            continue
        fds = []
        try:
            for suffix, why in BUSY:
                fd = acquire(cache_dir, lock_path(cache_dir, e.kind, e.name, suffix), fcntl.LOCK_EX)
                if fd is None:
                    result.kept.append((e, f"{why} by a running shortgpt-serve"))
                    break
                fds.append(fd)
            else:
                if e.leftover:
                    delete(e.path)
                else:
                    discard(cache_dir, e.path)
                result.removed.append(e)
                if not (cache_dir / e.kind / e.name).exists():
                    forget(cache_dir, e.kind, e.name)
        finally:
            for fd in fds:
                os.close(fd)
    return result
