"""The cache: each entry keyed by what determines it, verified before reuse, written whole, computed once.

Layout of the cache folder (``Config.resolved_cache_dir()``)::

    models/<name>-<key>/        GGUF and pickle inputs converted to safetensors
    profiles/<key>/             Block Influence profiles
    quality/<key>/              the full model's benchmark scores
    checkpoints/<name>-<key>/   shortened checkpoints
    benchmarks/<key>/           startup side-by-side benchmark results
    hashes/                     memo of file sha256s by path, device, inode, size, mtime and ctime
    locks/<kind>/<entry>.lock   held exclusively while an entry is checked, computed or removed
    locks/<kind>/<entry>.use    held shared while a launcher serves from the entry

An entry's key is the sha256 of the canonical JSON of a dict of everything that determines it (plus the kind and
the tool version). The dict is kept in the entry's manifest (``.entry.json``: kind, key, creation time, a
description, the sha256 of every file and a checksum of itself), so ``cache list`` can say what an entry is.
Entries are written into a temp folder beside their place and renamed into it; an entry that fails its manifest
is logged, removed and rebuilt, never served. Locks are ``flock`` locks: the kernel drops them when their process
dies, so a killed launcher never leaves a lock behind, and whoever holds an entry's lock may remove the temp
folders it left.

The parts, each its own module: ``layout`` (folder and file names), ``keys``, ``failures`` (failed writes as one
line), ``removal``, ``locks``, ``hashes`` (the file hash memo), ``manifest``, ``store`` (reuse or compute an
entry) and ``listing`` (``cache list`` / ``cache clear``).
"""

from shortgpt_serve.cache.failures import FULL_ERRNOS, WRITE_ERRNOS, write_error, writing
from shortgpt_serve.cache.hashes import FileHashes, Hasher
from shortgpt_serve.cache.keys import KEY_CHARS, digest, entry_name, full_key
from shortgpt_serve.cache.layout import DATA, HASHES, HUB, KINDS, LEFTOVER, LOCKS, MANIFEST
from shortgpt_serve.cache.listing import Cleared, Entry, clear, entries, select, verify
from shortgpt_serve.cache.locks import entry_of, held, in_use, lock, lock_path
from shortgpt_serve.cache.manifest import check, manifest_data, read_manifest, write_manifest
from shortgpt_serve.cache.removal import discard, remove_leftovers
from shortgpt_serve.cache.store import cached_json, folder_entry, load_json, store_json, usable

__all__ = [
    "DATA",
    "FULL_ERRNOS",
    "HASHES",
    "HUB",
    "KEY_CHARS",
    "KINDS",
    "LEFTOVER",
    "LOCKS",
    "MANIFEST",
    "WRITE_ERRNOS",
    "Cleared",
    "Entry",
    "FileHashes",
    "Hasher",
    "cached_json",
    "check",
    "clear",
    "digest",
    "discard",
    "entries",
    "entry_name",
    "entry_of",
    "folder_entry",
    "full_key",
    "held",
    "in_use",
    "load_json",
    "lock",
    "lock_path",
    "manifest_data",
    "read_manifest",
    "remove_leftovers",
    "select",
    "store_json",
    "usable",
    "verify",
    "write_error",
    "write_manifest",
    "writing",
]
