"""The file hash memo: sha256 of files kept in the cache by (path, device, inode, size, mtime, ctime)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from shortgpt_serve.cache.failures import writing
from shortgpt_serve.cache.layout import HASHES
from shortgpt_serve.fsutil import atomic_write_text, sha256_file

# A memoized hash is trusted only for files last changed this long before it was recorded: a change within the
# same timestamp tick as the recording would otherwise keep the old size and times (git's "racy clean" problem).
RACY_NS = 2_000_000_000
Hasher = Callable[[Path], str]


class FileHashes:
    """sha256 of files, memoized in the cache by (path, device, inode, size, mtime, ctime).

    A warm start then stats a model's files instead of reading them; a changed file (any write changes its ctime,
    which no tool can set back) is read again. Corruption that bypasses the filesystem (bad media) is not seen by
    the memo: ``shortgpt-serve cache list --verify`` reads every byte.
    """

    def __init__(self, cache_dir: Path, *, deferred: bool = False) -> None:
        """``deferred``: keep new hashes in memory until ``save()`` (so a refused input leaves the cache as it was)."""
        self.cache_dir = cache_dir
        self.folder = cache_dir / HASHES
        self.deferred = deferred
        self.pending: dict[Path, dict[str, Any]] = {}
        self.bytes_read = 0
        self.memo_hits = 0

    def sha256(self, path: Path) -> str:
        real = path.resolve()
        ident = _identity(real)
        memo = self._memo_path(real)
        known = self._recorded(memo, ident)
        if known is not None:
            self.memo_hits += 1
            return known
        value = sha256_file(real)
        self.bytes_read += int(ident[3])
        if _identity(real) == ident:  # unchanged while we read it
            self.pending[memo] = {"path": str(real), "identity": ident, "sha256": value, "recorded_ns": time.time_ns()}
            if not self.deferred:
                self.save()
        return value

    def known(self, path: Path) -> str | None:
        """The file's sha256 if the memo holds it for the file as it is now (recorded or computed this run), else
        None; never reads the file."""
        real = path.resolve()
        try:
            ident = _identity(real)
        except OSError:
            return None
        return self._recorded(self._memo_path(real), ident)

    def _memo_path(self, real: Path) -> Path:
        return self.folder / f"{hashlib.sha256(str(real).encode()).hexdigest()[:32]}.json"

    def _recorded(self, memo: Path, ident: list[Any]) -> str | None:
        rec = self.pending.get(memo)
        with suppress(OSError, ValueError, KeyError, TypeError):
            rec = rec or json.loads(memo.read_text())
            value = rec["sha256"]
            if (
                rec["identity"] == ident
                and rec["recorded_ns"] - max(ident[4], ident[5]) > RACY_NS
                and re.fullmatch(r"[0-9a-f]{64}", value)
            ):
                return str(value)
        return None

    def save(self) -> None:
        for memo, record in self.pending.items():
            with writing(self.cache_dir), suppress(FileNotFoundError):  # a `cache clear` removed the folder
                atomic_write_text(memo, json.dumps(record) + "\n")
        self.pending.clear()


def _identity(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
