"""Safetensors primitives: which file holds which tensor, tensor shapes, layer-key renaming.

Reads headers only; nothing here loads a whole model.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import re
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

from shortgpt_serve.errors import ModelError

INDEX_NAME = "model.safetensors.index.json"


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index if there is one, else from the single shard's header."""
    from safetensors import safe_open

    index = folder / INDEX_NAME
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelError(f"{index} is not a valid safetensors index ({exc}).") from exc
        missing = sorted({f for f in mapping.values() if not (folder / f).is_file()})
        if missing:
            raise ModelError(f"{index} names missing shard(s) {', '.join(missing)}; the checkpoint is incomplete.")
        return dict(mapping)
    shards = sorted(folder.glob("*.safetensors"))
    if len(shards) != 1:
        raise ModelError(
            f"{folder} has {len(shards)} safetensors files and no {INDEX_NAME}; keep exactly one file or add the index."
        )
    try:
        with safe_open(shards[0], framework="pt") as f:
            return {name: shards[0].name for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:
        raise ModelError(f"{shards[0]} is not a readable safetensors file ({exc}); the checkpoint is damaged.") from exc


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map(folder).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(folder / file, framework="pt") as f:
            for name in names:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


@dataclass(frozen=True)
class Stored:
    """Where one tensor lies: its shard, the byte range of its data, its stored dtype and shape."""

    path: Path
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]


def stored_tensors(folder: Path) -> dict[str, Stored]:
    """Every tensor of a safetensors checkpoint, from the shards' headers alone."""
    out: dict[str, Stored] = {}
    mapping = weight_map(folder)
    for file in sorted(set(mapping.values())):
        path = folder / file
        header, data_start = read_header(path)
        for name, info in header.items():
            if name == "__metadata__" or mapping.get(name) != file:
                continue
            begin, end = info["data_offsets"]
            out[name] = Stored(path, data_start + begin, data_start + end, str(info["dtype"]), tuple(info["shape"]))
    return out


def tensor_infos(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape), from the shards' headers alone."""
    return {name: (t.dtype, t.shape) for name, t in stored_tensors(folder).items()}


def layer_pattern(prefix: str) -> re.Pattern[str]:
    """Matches ``<prefix>.<i>.<rest>`` and captures i and rest."""
    return re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")


def layer_of(name: str, pattern: re.Pattern[str]) -> int | None:
    m = pattern.match(name)
    return int(m.group(1)) if m else None


def params_by_layer(shapes: Mapping[str, tuple[int, ...] | int], prefix: str, num_layers: int) -> tuple[list[int], int]:
    """Parameters in each decoder layer, and outside all layers (embeddings, head, final norm), from each tensor's
    shape or its parameter count (``models.params.param_counts``: quantized tensors unpacked)."""
    pattern = layer_pattern(prefix)
    per_layer = [0] * num_layers
    other = 0
    for name, shape in shapes.items():
        count = shape if isinstance(shape, int) else prod(shape)
        i = layer_of(name, pattern)
        if i is None:
            other += count
        elif i >= num_layers:
            raise ModelError(
                f"weight {name} belongs to layer {i}, but config.json says num_hidden_layers={num_layers}; "
                "the config and the weights disagree."
            )
        else:
            per_layer[i] += count
    return per_layer, other


def check_layer_count(names: list[str], prefix: str, num_layers: int, where: str) -> None:
    """The weights hold exactly layers 0..num_layers-1, as config.json says."""
    pattern = layer_pattern(prefix)
    found = {i for i in (layer_of(n, pattern) for n in names) if i is not None}
    if found != set(range(num_layers)):
        raise ModelError(
            f"{where}: config.json says num_hidden_layers={num_layers} but the weights hold layers "
            f"{min(found, default=0)}..{max(found, default=-1)} ({len(found)} of them); the config and the weights "
            "disagree. Fix config.json or use the matching weights."
        )


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (name -> {dtype, shape, data_offsets}, plus __metadata__) and where data starts.

    Raises :class:`ModelError` when the file is too short for its header or the header is not a JSON object.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if header_len is None or 8 + header_len > size:  # too short for its own header: truncated or foreign
            raise ModelError(f"{path} is not a readable safetensors file; the checkpoint is damaged.")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path} is not a readable safetensors file ({exc}); the checkpoint is damaged.") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a readable safetensors file; the checkpoint is damaged.")
    return header, 8 + header_len


def check_readable(folder: Path, mapping: dict[str, str]) -> None:
    """Every shard's header parses and its data is as long as the header says (catches truncated files)."""
    for shard in sorted(set(mapping.values())):
        path = folder / shard
        header, data_start = read_header(path)
        size = path.stat().st_size
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if data_start + end != size:
            raise ModelError(
                f"{path} is {size} bytes but its header describes {data_start + end}; the checkpoint is "
                "damaged (truncated or padded). Download or copy it again."
            )


def copy_tensors(
    src: Path,
    renames: list[tuple[str, str]],
    dst: Path,
    metadata: dict[str, str] | None = None,
    chunk: int = 1 << 24,
    overrides: Mapping[str, bytes] | None = None,
) -> tuple[int, str]:
    """Write the tensors ``renames`` names (old -> new) from safetensors file ``src`` into a new file ``dst``.

    The bytes are copied as they are, range by range, without building tensors: memory stays at one ``chunk``
    whatever the shard's size, and quantized or exotic dtypes pass through untouched. ``overrides`` (old name ->
    raw bytes of the same dtype and size) replaces some tensors' data (healed weights). Returns the data bytes
    written and the sha256 of the whole file, hashed as it is written (no second read).
    """
    header, data_start = read_header(src)
    overrides = overrides or {}
    for old, data in overrides.items():
        start, end = header[old]["data_offsets"]
        if len(data) != end - start:
            raise ModelError(f"the new data for {old} is {len(data)} bytes, not {end - start}.")
    entries = sorted(((header[old], new) for old, new in renames), key=lambda e: e[0]["data_offsets"][0])
    olds = {new: old for old, new in renames}
    new_header: dict[str, Any] = {}
    if metadata:
        new_header["__metadata__"] = metadata
    offset = 0
    for info, new in entries:
        start, end = info["data_offsets"]
        new_header[new] = {
            "dtype": info["dtype"],
            "shape": info["shape"],
            "data_offsets": [offset, offset + end - start],
        }
        offset += end - start
    raw = json.dumps(new_header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    # Adjacent kept tensors form one range: fewer, larger copies. An overridden tensor is a range of its own.
    ranges: list[list[int]] = []
    replaced: dict[int, bytes] = {}
    for info, new in entries:
        start, end = info["data_offsets"]
        override = overrides.get(olds[new])
        if override is not None:
            replaced[len(ranges)] = override
            ranges.append([start, end])
        elif ranges and ranges[-1][1] == start and len(ranges) - 1 not in replaced:
            ranges[-1][1] = end
        else:
            ranges.append([start, end])
    digest = hashlib.sha256()
    prefix = struct.pack("<Q", len(raw)) + raw
    digest.update(prefix)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(prefix)
        fout.flush()
        if fin.seek(0, 2) < data_start + (ranges[-1][1] if ranges else 0):
            raise ModelError(f"{src} ends early; the checkpoint is damaged (truncated).")
        # The copy runs in the kernel (copy_file_range) while a thread hashes the same bytes from a read-only
        # map of the source: both release the GIL, so two cores share the work and no byte passes through Python.
        # The map is hashed a window at a time and each hashed window is unmapped again, so the process holds
        # about one window of the source's pages, not the whole shard.
        with _mapped(fin) as (mm, view):
            failed: list[BaseException] = []

            def hash_ranges() -> None:
                try:
                    for k, (a, b) in enumerate(ranges):
                        if k in replaced:
                            digest.update(replaced[k])
                            continue
                        for at in range(data_start + a, data_start + b, chunk):
                            end = min(at + chunk, data_start + b)
                            digest.update(view[at:end])
                            _drop_pages(mm, at, end)
                except BaseException as exc:  # raised in the caller's thread below, never a wrong hash
                    failed.append(exc)

            hasher = threading.Thread(target=hash_ranges)
            hasher.start()
            try:
                at = 0
                for k in sorted(replaced):  # copy up to each overridden tensor, write its data, go on
                    _copy_ranges(fin, fout, [(data_start + a, b - a) for a, b in ranges[at:k]], chunk)
                    fout.write(replaced[k])
                    fout.flush()  # the kernel copies that follow write at the descriptor's offset
                    at = k + 1
                _copy_ranges(fin, fout, [(data_start + a, b - a) for a, b in ranges[at:]], chunk)
            finally:
                hasher.join()
            if failed:
                raise failed[0]
    return offset, digest.hexdigest()


def copy_verbatim(src: Path, dst: Path) -> None:
    """Copy file ``src`` byte for byte to ``dst`` (in the kernel where it can), hashing nothing."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        _copy_ranges(fin, fout, [(0, os.fstat(fin.fileno()).st_size)], 1 << 24)


@contextlib.contextmanager
def _mapped(f: BinaryIO) -> Iterator[tuple[mmap.mmap | None, memoryview]]:
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        yield None, memoryview(b"")
        return
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            yield mm, view
        finally:
            view.release()


def _drop_pages(mm: mmap.mmap | None, start: int, end: int) -> None:
    """Unmap the pages of ``mm`` from the one holding ``start`` up to the one holding ``end`` (excluded) from this
    process, once their bytes are hashed; they stay in the page cache, and a later read maps them again."""
    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if mm is not None and last > first and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)


def _copy_ranges(fin: BinaryIO, fout: BinaryIO, ranges: list[tuple[int, int]], chunk: int) -> None:
    """Append byte ranges (offset, length) of ``fin`` to ``fout``: in the kernel where it can, else by blocks."""
    for offset, length in ranges:
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), length - done, offset + done)
                if n == 0:
                    raise ModelError(f"{fin.name} ends early; the checkpoint is damaged (truncated).")
                done += n
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EINVAL,
                errno.EOPNOTSUPP,
            ):
                raise
            fin.seek(offset + done)
            while done < length:
                block = fin.read(min(chunk, length - done))
                if not block:
                    raise ModelError(f"{fin.name} ends early; the checkpoint is damaged (truncated).") from None
                fout.write(block)
                done += len(block)
            fout.flush()  # a later range may be copied by the kernel, at the descriptor's offset
