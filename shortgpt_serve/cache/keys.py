"""Entry keys: the sha256 of the canonical JSON of everything that determines an entry, and its folder name."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from shortgpt_serve.version import __version__

KEY_CHARS = 16


def full_key(kind: str, key: Mapping[str, Any]) -> dict[str, Any]:
    """What an entry is keyed by: the caller's dict, the kind and the tool version."""
    return {"kind": kind, "tool_version": __version__, **key}


def digest(key: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``key`` (sorted keys, no spaces)."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def entry_name(kind: str, key: Mapping[str, Any], label: str | None = None) -> str:
    """The entry's folder name: ``<label>-<key prefix>`` or the key prefix alone."""
    short = digest(full_key(kind, key))[:KEY_CHARS]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).lstrip(".") if label else ""
    return f"{safe}-{short}" if safe else short
