"""Host memory on a streamed CPU pass: layer tensors reused from layer to layer, and freed pages given back.

A streamed pass allocates and frees a layer's weights and activations over and over; glibc, left to itself, keeps
much of that in its heap (measured on a 6 GB model: benchmarks/results/streaming_profile.md). :class:`Pool` reuses
the weights' buffers, :func:`trimmer` returns the heap's free pages (and fixes glibc's mmap threshold), and
:class:`Settler` does that between steps when the memory setting is tight.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Pool:
    """Host tensors handed back when a layer is dropped and reused by the next layer's reads.

    Every decoder layer has the same shapes, so two layers' worth of tensors, reused, is all a pass needs. Reuse
    saves both the heap and the time: glibc raises its mmap threshold after each large free (up to 32 MiB), after
    which mid-sized tensors (attention projections) land in heap arenas that are not returned (measured on a 6 GB
    model, the resident set grew by ~35 MB per layer streamed); and a fresh mapping for a large tensor (an MLP
    projection) is faulted in and zeroed page by page before the read fills it, which on 2 cores cost about as
    much as the read itself.
    """

    def __init__(self, per_shape: dict[tuple[int, ...], int]) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._keep = per_shape
        """How many of each shape to keep: as many as two layers hold."""

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        found = self._free.get((shape, dtype))
        return found.pop() if found else None

    def clear(self) -> None:
        """Everything kept let go: for the parts of a pass that bring no layer (embeddings, head)."""
        self._free.clear()

    def give(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "cpu":
            kept = self._free.setdefault((tuple(tensor.shape), tensor.dtype), [])
            if len(kept) < self._keep.get(tuple(tensor.shape), 0):
                kept.append(tensor)


class Settler:
    """Trims the heap when the resident set has grown by more than ``slack`` since the last trim.

    Measured on a 6 GB model streamed at the least memory setting (benchmarks/results/streaming_profile.md): without
    it the peak RSS spread over 820-900 MiB; trimming after every batch's step held it at 823-834 MiB but cost 15%
    more time (a trim walks the heap, and the pages it returns are faulted in again by the next step); trimming only
    past 64 MiB of growth (56 trims of 232 steps) held 806-814 MiB at 1.20x the resident time, against 1.08x.
    """

    def __init__(self, trim: Callable[[], None], slack: int = 64 << 20) -> None:
        self._trim, self._slack = trim, slack
        self._floor = 0

    @staticmethod
    def _resident() -> int | None:
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def __call__(self) -> None:
        resident = self._resident()
        if resident is None or resident > self._floor + self._slack:  # unknown: always trim
            self._trim()
            self._floor = self._resident() or 0


MMAP_THRESHOLD = 8 << 20
"""On a streamed CPU pass, host allocations of this size or more get their own mapping, returned when freed."""


def trimmer() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``: the heap's free pages returned to the system (a no-op without glibc).

    Also fixes glibc's mmap threshold at :data:`MMAP_THRESHOLD` for the process (``mallopt(M_MMAP_THRESHOLD)``),
    which stops glibc from raising it after each large free: otherwise, once a layer's tensors are dropped, a batch's
    logits (31 MiB at 512 positions x 32,000 tokens in bfloat16) and their float32 slices land in the heap and stay
    there between trims. Measured on a 6 GB model streamed, the scoring pass's peak at the head fell from about
    1,000 to under 900 MiB (benchmarks/results/streaming_profile.md). A threshold set in the environment
    (``MALLOC_MMAP_THRESHOLD_``) is left as it is: at 2 MiB the peak held steady ~100 MiB lower, at 1.4x the time.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim, mallopt = libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):
        return lambda: None
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    return lambda: trim(0) and None
