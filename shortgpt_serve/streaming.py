"""The streamed placement: each decoder layer's weights read from the safetensors shards when the pass reaches it.

The model is built empty (every parameter on the ``meta`` device; buffers such as rotary tables are real, on the
pass's device). A pass holds at most two layers' weights: the one it runs and the next, which a reader thread
brings from disk while the current one computes; where the memory setting holds one layer and a part, the reader
brings that part (the layer's first tensors, in the order the layer uses them) and the rest is read when the layer
starts, after the one before it is dropped. The modules before the layers (the embeddings) and the head (the
final norm and the output embeddings) are brought in for their own part of the pass only. Weights are cast to the
model's dtype as they are read, so ``model.to(dtype)`` on the empty model changes what the next pass computes in.

Streaming needs the checkpoint's tensor names to be the model's own parameter names (families that transformers
converts on load, e.g. MoE models with fused experts, are refused with the setting to change).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from itertools import pairwise
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

from shortgpt_serve.errors import ModelError
from shortgpt_serve.hostmem import Pool, Settler, trimmer
from shortgpt_serve.models.weights import Stored, layer_of, layer_pattern, stored_tensors
from shortgpt_serve.placement import final_norm, free_bytes

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from shortgpt_serve.models.families import Family

log = logging.getLogger(__name__)

DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32"}
"""Safetensors dtypes the streamed placement reads."""


def read_tensor(
    stored: Stored, dtype: torch.dtype, pin: bool = False, into: torch.Tensor | None = None
) -> torch.Tensor:
    """One tensor read from its shard with plain file reads (no memory map stays behind), cast to ``dtype``;
    ``into``: a tensor of that shape and dtype to fill instead of a new one."""
    import torch

    if stored.dtype not in DTYPES:
        raise ModelError(f"{stored.path} stores a tensor as {stored.dtype}; streaming reads {', '.join(DTYPES)} only.")
    src = getattr(torch, DTYPES[stored.dtype])
    direct = into is not None and src == dtype
    raw = into.view(-1).view(torch.uint8) if direct else None  # type: ignore[union-attr]
    if raw is None:
        raw = torch.empty(stored.end - stored.start, dtype=torch.uint8, pin_memory=pin)
    with open(stored.path, "rb") as f:
        f.seek(stored.start)
        view = memoryview(raw.numpy())  # type: ignore[arg-type]
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise ModelError(f"{stored.path} ends inside a tensor's data; the checkpoint is damaged.")
            got += n
    tensor = raw.view(src).reshape(stored.shape)
    if direct:
        return tensor  # the data of ``into``, read in place
    if into is not None:
        return into.copy_(tensor)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _set(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    import torch

    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


class Streamed:
    """Weights on disk; each part of the pass brings its own to ``device`` and drops them after (see the module
    docstring)."""

    def __init__(
        self, model: PreTrainedModel, family: Family, folder: Path, device: torch.device, ahead: int | None = None
    ) -> None:
        """``ahead``: bytes of the next layer read while the current one computes (None: the whole layer)."""
        import torch

        self.model, self.family, self.device = model, family, device
        stored = stored_tensors(folder)
        params = dict(model.named_parameters(remove_duplicate=False))
        self._shapes = {n: tuple(p.shape) for n, p in params.items()}
        source = {n: n for n in params if n in stored}
        out_emb, in_emb = _embedding_names(model)
        if out_emb and out_emb not in source and in_emb in stored:
            source[out_emb] = in_emb  # tied: the checkpoint keeps the input embeddings only
        missing = sorted(set(params) - set(source))
        if missing:
            raise ModelError(
                f"{family.model_type}: the checkpoint's tensor names differ from the model's ({missing[0]} not found; "
                "transformers converts this family's weights on load), so its layers cannot be streamed; give the "
                "profile enough memory to hold the whole model (--memory)."
            )
        wrong = [n for n in source if tuple(stored[source[n]].shape) != self._shapes[n]]
        if wrong:
            raise ModelError(
                f"{wrong[0]} has shape {stored[source[wrong[0]]].shape} in the checkpoint, not "
                f"{self._shapes[wrong[0]]}; the config and the weights disagree."
            )
        self._stored = {n: stored[s] for n, s in source.items()}
        pattern = layer_pattern(family.layers_module)
        self.num_layers = int(model.config.num_hidden_layers)
        self._layer_names: list[list[str]] = [[] for _ in range(self.num_layers)]
        outside: list[str] = []
        for n in params:
            i = layer_of(n, pattern)
            (outside if i is None else self._layer_names[i]).append(n)
        self._norm = final_norm(model, family)
        head_modules = {family.layers_module.rpartition(".")[0] + ".norm"}  # where final_norm finds it
        if out_emb:
            head_modules.add(out_emb.rpartition(".")[0])
        self._head_names = [n for n in outside if n.rpartition(".")[0] in head_modules]
        self._embed_names = [n for n in outside if n not in self._head_names]
        self._layers = [model.get_submodule(f"{family.layers_module}.{i}") for i in range(self.num_layers)]
        self._ahead = [self._prefix(names, ahead) for names in self._layer_names]
        """Each layer's tensors read ahead: its first ones, in the order the model defines them, up to ``ahead``."""
        for module in model.modules():  # real buffers (rotary tables) go where the pass computes
            for key, buf in list(module._buffers.items()):
                if buf is not None and buf.device.type != "meta":
                    module._buffers[key] = buf.to(device)
        self._pin = device.type == "cuda" and torch.cuda.is_available()
        shapes = Counter(self._shapes[n] for n in self._layer_names[0])
        self._pool = Pool({shape: 2 * count for shape, count in shapes.items()})
        # A layer's activations are freed into glibc's heap, which keeps them: trimmed after each layer (on a
        # 6 GB model the streamed peak RSS fell from 1555 to 1118 MiB; benchmarks/results/streaming_profile.md).
        self._trim = trimmer() if device.type == "cpu" else (lambda: None)
        tight = ahead is not None and ahead < self.unit_bytes()["layer"]
        self._settle = Settler(self._trim) if tight and device.type == "cpu" else (lambda: None)
        """With less than a layer read ahead (the memory setting is tight), the heap is trimmed after a batch's step
        too, when the process has grown since the last trim: a batch's activations, freed amid states that live on,
        otherwise leave pages behind (see :class:`~shortgpt_serve.hostmem.Settler`)."""
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shortgpt-stream")
        self._next: tuple[int, Future[dict[str, torch.Tensor]]] | None = None
        self._after: dict[int, int] = {}  # the layer read ahead after each: the next one unless :meth:`expect` said
        self.read_s = 0.0
        self._head_held = False

    # --- sizes ---------------------------------------------------------------------------------------------------

    def _bytes(self, names: list[str]) -> int:
        size = next(self.model.parameters()).element_size()
        return sum(prod(self._shapes[n]) * size for n in names)

    def _prefix(self, names: list[str], limit: int | None) -> list[str]:
        """The first of ``names`` whose bytes together stay within ``limit`` (None: all of them)."""
        if limit is None:
            return names
        total, kept = 0, 0
        for n in names:
            total += self._bytes([n])
            if total > limit:
                break
            kept += 1
        return names[:kept]

    def unit_bytes(self) -> dict[str, int]:
        """Bytes, as computed, of each unit a pass brings in at once: the largest decoder layer, the embeddings, the
        head (final norm and output embeddings)."""
        layer = max(self._bytes(names) for names in self._layer_names)
        return {"layer": layer, "embedding": self._bytes(self._embed_names), "head": self._bytes(self._head_names)}

    def total_bytes(self) -> int:
        return self._bytes(list(self._shapes))

    def settle(self) -> None:
        self._settle()

    def free_bytes(self) -> int | None:
        free = free_bytes(self.device)
        return None if free is None else max(0, free - 2 * max(self.unit_bytes().values()))

    # --- reading ---------------------------------------------------------------------------------------------------

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        import torch

        t0 = time.perf_counter()
        dtype = next(self.model.parameters()).dtype
        # Plain tensors, never inference-mode ones, even when read inside a pass's inference mode: a layer-by-layer
        # distillation runs them with gradients, and pooled tensors are filled in place in any thread.
        with torch.inference_mode(False), torch.no_grad():
            out = {
                n: read_tensor(self._stored[n], dtype, self._pin, self._pool.take(self._shapes[n], dtype))
                for n in names
            }
        self.read_s += time.perf_counter() - t0
        return out

    def _fetch(self, index: int) -> dict[str, torch.Tensor]:
        """Layer ``index``'s weights on the host: the one prefetched, or read now; then the next one is started."""
        ahead, self._next = self._next, None
        tensors = ahead[1].result() if ahead is not None and ahead[0] == index else {}
        rest = [n for n in self._layer_names[index] if n not in tensors]
        if rest:  # not read ahead, or only in part: the layer before is dropped by now
            tensors.update(self._read(rest))
        after = self._after.get(index, index + 1)
        if 0 <= after < self.num_layers and self._ahead[after]:
            self._next = (after, self._reader.submit(self._read, self._ahead[after]))
        return tensors

    def expect(self, order: Sequence[int]) -> None:
        """The layers will be asked for in ``order`` (backwards, or some skipped): each is read ahead after the one
        before it in ``order``, and nothing after the last; layers not in it are followed by the next one."""
        self._after = dict(pairwise(order))
        if order:
            self._after[order[-1]] = -1

    @contextmanager
    def _brought(self, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
        import torch

        try:
            for n, t in tensors.items():
                _set(self.model, n, t.to(self.device, non_blocking=True))
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            yield
        finally:
            for n, t in tensors.items():
                _set(self.model, n, torch.empty(self._shapes[n], dtype=t.dtype, device="meta"))
                self._pool.give(t)
            self._trim()

    def _unit(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The embeddings' or the head's weights, read after the pool's layer-sized tensors are let go (no layer
        is held while they run; measured on a 6 GB model, the pool held ~45 MiB there)."""
        self._pool.clear()
        self._trim()
        return self._read(names)

    @contextmanager
    def embedding(self) -> Iterator[None]:
        with self._brought(self._unit(self._embed_names)):
            yield

    @contextmanager
    def layer(self, index: int) -> Iterator[torch.nn.Module]:
        with self._brought(self._fetch(index)):
            yield self._layers[index]

    @contextmanager
    def head(self) -> Iterator[torch.nn.Module]:
        """Re-entrant: a logits reader inside a pass's head (the divergence measure computes the full model's
        logits there) uses the weights already brought, not a second read that would drop them on its exit."""
        if self._head_held:
            yield self._norm
            return
        self._head_held = True
        try:
            with self._brought(self._unit(self._head_names)):
                yield self._norm
        finally:
            self._head_held = False

    def probe(self) -> float:
        """Seconds one pass spends reading weights, estimated from reading layer 0 now (what is read ahead of it is
        kept for the first pass).

        For a GPU the reads land in page-locked host memory; its first allocation (a one-off: later layers reuse
        the freed blocks) is made before the clock starts. Timed with it, the estimate was 3.6x the reading an
        H200 machine measured (11.5 against 3.2 s per pass; benchmarks/results/gpu_check.md)."""
        import torch

        names = self._ahead[0] or self._layer_names[0]
        if self._pin:
            for n in names:
                stored = self._stored[n]
                torch.empty(stored.end - stored.start, dtype=torch.uint8, pin_memory=True)
        t0 = time.perf_counter()
        tensors = self._read(names)
        seconds = time.perf_counter() - t0
        if self._ahead[0]:
            done: Future[dict[str, torch.Tensor]] = Future()
            done.set_result(tensors)
            self._next = (0, done)
        return seconds * self.total_bytes() / max(1, self._bytes(names))

    def close(self) -> None:
        if self._next is not None:
            with contextlib.suppress(Exception):
                self._next[1].result()
            self._next = None
        self._reader.shutdown(wait=True)


def _embedding_names(model: PreTrainedModel) -> tuple[str | None, str | None]:
    """The parameter names of the output and the input embeddings' weights."""
    out_mod, in_mod = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    out = f"{names[id(out_mod)]}.weight" if out_mod is not None and id(out_mod) in names else None
    inp = f"{names[id(in_mod)]}.weight" if in_mod is not None and id(in_mod) in names else None
    return out, inp


def empty_model(folder: Path, dtype: str, device: torch.device, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model built without weights (parameters on ``meta``, buffers real), in eval mode, in ``dtype``."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    model.eval()
    return model
