"""Getting an entry: reused when it checks out against its manifest, else computed once and written whole.

Two shapes: a folder built by the caller (converted models, checkpoints) and one JSON object (profiles, scores,
benchmark results). A damaged entry is logged, removed and rebuilt, never served.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shortgpt_serve.cache.failures import writing
from shortgpt_serve.cache.hashes import FileHashes, Hasher
from shortgpt_serve.cache.keys import digest, entry_name, full_key
from shortgpt_serve.cache.layout import DATA
from shortgpt_serve.cache.locks import lock
from shortgpt_serve.cache.manifest import check, write_manifest
from shortgpt_serve.cache.removal import discard
from shortgpt_serve.fsutil import atomic_dir, sha256_file

log = logging.getLogger(__name__)


def usable(cache_dir: Path, kind: str, name: str, key_sha256: str, hasher: Hasher) -> bool:
    """Whether the entry exists and checks out; a damaged one is logged and removed. Hold its lock."""
    path = cache_dir / kind / name
    if not path.exists() and not path.is_symlink():
        return False
    problem = check(path, key_sha256, hasher)
    if problem is None:
        return True
    log.warning("Cache entry %s/%s is damaged (%s): removed, rebuilding it", kind, name, problem)
    discard(cache_dir, path)
    return False


def folder_entry(
    cache_dir: Path,
    kind: str,
    key: Mapping[str, Any],
    *,
    label: str | None,
    build: Callable[[Path], None],
    description: str,
    hasher: FileHashes | None = None,
) -> tuple[Path, bool]:
    """The entry folder for ``key``, built by ``build(tmp)`` unless a verified one exists; (path, reused)."""
    name = entry_name(kind, key, label)
    path = cache_dir / kind / name
    want = digest(full_key(kind, key))
    with lock(cache_dir, kind, name):
        if usable(cache_dir, kind, name, want, (hasher or FileHashes(cache_dir)).sha256):
            return path, True
        with writing(cache_dir), atomic_dir(path, overwrite=True) as tmp:
            build(tmp)
            write_manifest(tmp, kind, key, description)
        return path, False


def _read_json(cache_dir: Path, kind: str, name: str, want: str) -> dict[str, Any] | None:
    if not usable(cache_dir, kind, name, want, sha256_file):
        return None
    try:
        data = json.loads((cache_dir / kind / name / DATA).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        log.warning("Cache entry %s/%s holds no JSON object: removed, rebuilding it", kind, name)
        discard(cache_dir, cache_dir / kind / name)
        return None
    return data


def _write_json(cache_dir: Path, kind: str, name: str, key: Mapping[str, Any], data: Any, description: str) -> Path:
    path = cache_dir / kind / name
    with writing(cache_dir), atomic_dir(path, overwrite=True) as tmp:
        (tmp / DATA).write_text(json.dumps(data, indent=2) + "\n")
        write_manifest(tmp, kind, key, description)
    return path


def load_json(cache_dir: Path, kind: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON object stored for ``key``, verified; None when there is none (a damaged one is removed)."""
    name = entry_name(kind, key)
    with lock(cache_dir, kind, name):
        return _read_json(cache_dir, kind, name, digest(full_key(kind, key)))


def store_json(cache_dir: Path, kind: str, key: Mapping[str, Any], data: Mapping[str, Any], describe: str = "") -> Path:
    """Store a JSON object for ``key`` (replacing any), written whole; returns the entry folder."""
    name = entry_name(kind, key)
    with lock(cache_dir, kind, name):
        return _write_json(cache_dir, kind, name, key, dict(data), describe)


def cached_json(
    cache_dir: Path,
    kind: str,
    key: Mapping[str, Any],
    compute: Callable[[], Mapping[str, Any]],
    describe: str | Callable[[Mapping[str, Any]], str] = "",
) -> tuple[dict[str, Any], bool]:
    """The JSON object for ``key``: stored, or ``compute()``d and stored, once across launchers; (data, reused)."""
    name = entry_name(kind, key)
    with lock(cache_dir, kind, name):
        found = _read_json(cache_dir, kind, name, digest(full_key(kind, key)))
        if found is not None:
            return found, True
        data = dict(compute())
        text = describe(data) if callable(describe) else describe
        _write_json(cache_dir, kind, name, key, data, text)
        return data, False
