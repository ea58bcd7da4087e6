"""An entry's manifest (``.entry.json``): its key, a description, the sha256 of every file and its own checksum."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shortgpt_serve.cache.hashes import Hasher
from shortgpt_serve.cache.keys import digest, full_key
from shortgpt_serve.cache.layout import MANIFEST
from shortgpt_serve.fsutil import sha256_file


def read_manifest(folder: Path) -> dict[str, Any]:
    """The entry's manifest, its own checksum verified; raises OSError/ValueError when missing or damaged."""
    data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    if data.get("manifest_sha256") != digest(body):
        raise ValueError("its checksum does not match")
    return data


def check(folder: Path, key_sha256: str | None, hasher: Hasher = sha256_file) -> str | None:
    """What is wrong with an entry (a short phrase), or None when it and every file match its manifest.

    ``key_sha256``: the key the entry must have been written for (None: the one its manifest names).
    """
    if not folder.is_dir():
        return "not a folder"
    try:
        m = read_manifest(folder)
    except FileNotFoundError:
        return f"no {MANIFEST} (half-written)"
    except (OSError, ValueError) as exc:
        return f"damaged {MANIFEST} ({exc})"
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST} lists no files"
    expected = key_sha256 or (digest(m["key"]) if isinstance(m.get("key"), dict) else None)
    if expected is None or m.get("key_sha256") != expected:
        return "written for another key"
    for rel, sha in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if hasher(path) != sha:
            return f"{rel} does not match its sha256"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        return f"unexpected file {extra[0]}"
    return None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def write_manifest(
    folder: Path, kind: str, key: Mapping[str, Any], description: str, data: Mapping[str, Any] | None = None
) -> None:
    """Write ``.entry.json`` into a complete folder about to become the entry for ``key`` (the caller's dict):
    the key, a description, the sha256 of every file, optional small ``data``, and a checksum of itself."""
    fk = full_key(kind, key)
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    record: dict[str, Any] = {
        "kind": kind,
        "key": fk,
        "key_sha256": digest(fk),
        "created": _now(),
        "describe": description,
        "files": files,
    }
    if data is not None:
        record["data"] = dict(data)
    record["manifest_sha256"] = digest(record)
    (folder / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")


def manifest_data(folder: Path) -> dict[str, Any]:
    """The ``data`` a verified entry's manifest carries."""
    data = read_manifest(folder).get("data")
    if not isinstance(data, dict):
        raise ValueError(f"{folder / MANIFEST} carries no data")
    return data
