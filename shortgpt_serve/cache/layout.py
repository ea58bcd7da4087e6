"""Names of the cache folder's parts: the kinds of entry, the side folders and the files inside an entry."""

from __future__ import annotations

import re

KINDS = ("models", "profiles", "quality", "checkpoints", "benchmarks")
HASHES = "hashes"
LOCKS = "locks"
HUB = "hub"
MANIFEST = ".entry.json"
DATA = "data.json"
# Temp folders of atomic writes (fsutil.atomic_dir) and of removals: `.<entry>.tmp-XXXX`, `.old-`, `.del-`.
LEFTOVER = re.compile(r"^\.(?P<name>[A-Za-z0-9._-]+?)\.(?:tmp|old|del)-[A-Za-z0-9_]*$")
