"""Failed writes into the cache (full, read-only, not a folder) turned into one clear line."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shortgpt_serve.errors import CacheError

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
WRITE_ERRNOS = FULL_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST}


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
