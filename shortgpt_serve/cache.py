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
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shortgpt_serve.version import __version__
from shortgpt_serve.errors import CacheError
from shortgpt_serve.fsutil import atomic_dir, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

KINDS = ("models", "profiles", "quality", "checkpoints", "benchmarks")
HASHES = "hashes"
LOCKS = "locks"
HUB = "hub"
MANIFEST = ".entry.json"
DATA = "data.json"
KEY_CHARS = 16
# Temp folders of atomic writes (fsutil.atomic_dir) and of removals: `.<entry>.tmp-XXXX`, `.old-`, `.del-`.
LEFTOVER = re.compile(r"^\.(?P<name>[A-Za-z0-9._-]+?)\.(?:tmp|old|del)-[A-Za-z0-9_]*$")
# A memoized hash is trusted only for files last changed this long before it was recorded: a change within the
# same timestamp tick as the recording would otherwise keep the old size and times (git's "racy clean" problem).
RACY_NS = 2_000_000_000
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
WRITE_ERRNOS = FULL_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}
Hasher = Callable[[Path], str]


# --- keys ------------------------------------------------------------------------------------------------------


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


# --- errors ----------------------------------------------------------------------------------------------------


def write_error(cache_dir: Path, exc: OSError) -> CacheError:
    reason = exc.strerror or str(exc)
    if exc.errno in FULL_ERRNOS:
        return CacheError(
            f"the cache {cache_dir} is full ({reason}); free space there, or point --cache-dir "
            "(or SHORTGPT_SERVE_CACHE_DIR) at a folder with room. Nothing half-written was kept."
        )
    where = f": {exc.filename}" if exc.filename else ""
    return CacheError(
        f"cannot write to the cache {cache_dir} ({reason}{where}); make it a writable folder, or point --cache-dir "
        "(or SHORTGPT_SERVE_CACHE_DIR) at one."
    )


@contextmanager
def writing(cache_dir: Path) -> Iterator[None]:
    """Turn a failed write into the cache (full, read-only, not a folder) into one clear line."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise write_error(cache_dir, exc) from exc


# --- locks -----------------------------------------------------------------------------------------------------


def lock_path(cache_dir: Path, kind: str, name: str, suffix: str = ".lock") -> Path:
    return cache_dir / LOCKS / kind / f"{name}{suffix}"


def _open_lock(cache_dir: Path, path: Path) -> int:
    with writing(cache_dir):
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            with suppress(FileNotFoundError):  # another launcher tidied the empty folder away just now
                return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _acquire(cache_dir: Path, path: Path, mode: int, waiting: str | None = None) -> int | None:
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


def _forget(cache_dir: Path, kind: str, name: str) -> None:
    """Remove an absent entry's lock files and the folders left empty (hold its lock): a failed or refused run
    leaves the cache as it found it."""
    for suffix in (".lock", ".use"):
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
    fd = _acquire(cache_dir, path, fcntl.LOCK_EX, waiting=f"{kind}/{name}")
    assert fd is not None
    try:
        with writing(cache_dir):
            os.utime(fd)
        remove_leftovers(cache_dir / kind, name)
        yield
    finally:
        if not (cache_dir / kind / name).exists():
            _forget(cache_dir, kind, name)
            for folder in created:  # deepest first, each only if still empty
                with suppress(OSError):
                    folder.rmdir()
        os.close(fd)


@contextmanager
def in_use(cache_dir: Path, kind: str, name: str) -> Iterator[None]:
    """Mark an entry as in use (a shared lock) so that ``cache clear`` leaves it alone while this is held."""
    fd = _acquire(cache_dir, lock_path(cache_dir, kind, name, ".use"), fcntl.LOCK_SH, waiting=f"{kind}/{name}")
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
    for suffix, why in ((".lock", "being written or checked"), (".use", "in use")):
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


# --- leftovers and removal -------------------------------------------------------------------------------------


def remove_leftovers(kind_dir: Path, name: str) -> None:
    """Remove the temp folders of interrupted writes of one entry; the caller holds its lock."""
    if not kind_dir.is_dir():
        return
    for p in kind_dir.glob(f".{name}.*"):
        m = LEFTOVER.match(p.name)
        if m and m["name"] == name:
            log.warning("Removing %s, left half-written by an interrupted shortgpt-serve", p)
            _delete(p)


def _delete(path: Path) -> None:
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
    _delete(gone)


# --- file hashes -----------------------------------------------------------------------------------------------


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
        memo = self.folder / f"{hashlib.sha256(str(real).encode()).hexdigest()[:32]}.json"
        with suppress(OSError, ValueError, KeyError, TypeError):
            rec = json.loads(memo.read_text())
            value = rec["sha256"]
            if (
                rec["identity"] == ident
                and rec["recorded_ns"] - max(ident[4], ident[5]) > RACY_NS
                and re.fullmatch(r"[0-9a-f]{64}", value)
            ):
                self.memo_hits += 1
                return str(value)
        value = sha256_file(real)
        self.bytes_read += int(ident[3])
        if _identity(real) == ident:  # unchanged while we read it
            self.pending[memo] = {"path": str(real), "identity": ident, "sha256": value, "recorded_ns": time.time_ns()}
            if not self.deferred:
                self.save()
        return value

    def save(self) -> None:
        for memo, record in self.pending.items():
            with writing(self.cache_dir), suppress(FileNotFoundError):  # a `cache clear` removed the folder
                atomic_write_text(memo, json.dumps(record) + "\n")
        self.pending.clear()


def _identity(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


# --- checking entries ------------------------------------------------------------------------------------------


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


# --- entries of each shape -------------------------------------------------------------------------------------


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


# --- listing and clearing --------------------------------------------------------------------------------------


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
            for suffix, why in ((".lock", "being written or checked"), (".use", "in use")):
                fd = _acquire(cache_dir, lock_path(cache_dir, e.kind, e.name, suffix), fcntl.LOCK_EX)
                if fd is None:
                    result.kept.append((e, f"{why} by a running shortgpt-serve"))
                    break
                fds.append(fd)
            else:
                if e.leftover:
                    _delete(e.path)
                else:
                    discard(cache_dir, e.path)
                result.removed.append(e)
                if not (cache_dir / e.kind / e.name).exists():
                    _forget(cache_dir, e.kind, e.name)
        finally:
            for fd in fds:
                os.close(fd)
    return result
