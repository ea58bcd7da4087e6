"""Removing entries and the temp folders of interrupted writes, each in a way no reader sees half done."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from shortgpt_serve.cache.failures import writing
from shortgpt_serve.cache.layout import LEFTOVER

log = logging.getLogger(__name__)


def remove_leftovers(kind_dir: Path, name: str) -> None:
    """Remove the temp folders of interrupted writes of one entry; the caller holds its lock."""
    if not kind_dir.is_dir():
        return
    for p in kind_dir.glob(f".{name}.*"):
        m = LEFTOVER.match(p.name)
        if m and m["name"] == name:
            log.warning("Removing %s, left half-written by an interrupted shortgpt-serve", p)
            delete(p)


def delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def discard(cache_dir: Path, path: Path) -> None:
    """Remove an entry: renamed out of its place first (one step), then deleted."""
    if not path.exists() and not path.is_symlink():
        return
    with writing(cache_dir):
        gone = Path(tempfile.mkdtemp(prefix=f".{path.name}.del-", dir=path.parent))
        os.rename(path, gone / "entry")
    delete(gone)
