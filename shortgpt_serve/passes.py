"""The pass engine: token batches through a causal LM's decoder stack, layer by layer, with observers.

Everything the tool learns about a model is such a pass: Block Influence and angular distances watch each
layer's input and output; benchmark scoring and perplexity read the logits, with some layers skipped. A pass is
*layer-major*: every batch goes through layer i before any goes through layer i + 1, so each layer's weights are
needed once per pass (a placement may bring them to the device just then: see :mod:`shortgpt_serve.placement`).

How a pass runs:

1. **Capture.** The model's own forward runs once per batch with every decoder layer replaced by a stand-in
   that records the arguments it is called with (hidden state, attention mask, position embeddings, ...) and
   passes the hidden state on unchanged; the last one stops the forward. So masks and position embeddings are
   the model's own, per layer where the family differs per layer (Gemma's sliding and full attention).
2. **Layers.** A pass may start at a layer boundary an earlier pass over the same batches kept (the full
   model's states there), so candidates that first differ deep in the stack do not recompute the layers
   before it. Each route (a candidate: layers to skip, layers run in a healed form) follows the states of the
   routes it agrees with so far. Routes share hidden states until the first layer where they differ: the full
   model and K candidates cost one walk over the weights, and each layer runs once per distinct set of states. Observers
   see (layer, batch, input, output, mask) as the pass goes and accumulate; only the states at the current
   boundary are held, one per batch and distinct route prefix.
3. **Head.** The final norm runs in the base model's place, and the model's own causal-LM forward turns its
   output into logits (so logit soft-capping or scaling, where a family has them, apply): the model's base is
   swapped for a stand-in that returns the normed state (:mod:`shortgpt_serve.head`). Consumers get each batch's
   logits.

No attention is re-implemented: the family's own layer modules and the model's own code run throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from shortgpt_serve.errors import ModelError
from shortgpt_serve.head import accepts_logits_to_keep, head_logits
from shortgpt_serve.models.layers import decoder_layers

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from shortgpt_serve.models.families import Family
    from shortgpt_serve.placement import Placement


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids and their mask ([batch, seq], nonzero on real tokens), on any device."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits_to_keep: int = 0
    """Logits wanted for the last N positions only (0: every position)."""
    allowed: torch.Tensor | None = None
    """A custom attention pattern ([batch, 1, seq, seq], True where query row may attend key column), for
    sequences that pack several continuations of one context; None: causal over the real tokens."""
    position_ids: torch.Tensor | None = None
    """Positions of the tokens ([batch, seq]) where they are not 0, 1, 2, ... (packed sequences)."""


class Observer(Protocol):
    """Sees one layer's input and output for one batch ([batch, seq, hidden]; the mask [batch, seq])."""

    def __call__(self, layer: int, batch: int, h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor) -> None: ...


LogitsConsumer = Callable[[int, "torch.Tensor"], None]
"""Receives (batch index, logits [batch, kept positions, vocab]) once per batch at the end of the pass."""


@dataclass
class Route:
    """One way through the stack: the layers it skips or runs in another form, what watches its layers, what
    reads its logits."""

    skip: frozenset[int] = frozenset()
    observers: Sequence[Observer] = ()
    on_logits: LogitsConsumer | None = None
    replace: Mapping[int, torch.nn.Module] = field(default_factory=dict)
    """Layers this route runs through its own module instead of the model's (a healed layer: same arguments,
    on the pass's device). Routes share states only while they agree on every layer so far."""

    def step(self, layer: int) -> Step:
        """What this route does at ``layer``: skip it, run the model's layer, or run its own module."""
        if layer in self.skip:
            return _SKIP
        module = self.replace.get(layer)
        return _PLAIN if module is None else (layer, id(module))

    def path(self, before: int) -> frozenset[Step]:
        """What this route did differently from the full model at the layers before ``before``."""
        steps = {(i, 0) for i in self.skip if i < before}
        return frozenset(steps | {(i, id(m)) for i, m in self.replace.items() if i < before})


Step = tuple[int, int]
"""(layer, 0) for a skipped layer, (layer, id of the module) for a replaced one; :data:`_PLAIN` otherwise."""
_SKIP: Step = (-1, 0)
_PLAIN: Step = (-1, -1)


@dataclass(frozen=True)
class Boundary:
    """The full model's hidden states entering decoder layer ``layer``, one per batch of a pass."""

    layer: int
    states: list[torch.Tensor]


@dataclass
class _Captured:
    hidden: torch.Tensor
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    """Per layer: the arguments after the hidden state, and the keyword arguments, the model called it with."""


class _Stop(Exception):
    """Raised by the last stand-in layer: the capture has what it needs."""


Sink = Callable[["torch.Tensor", tuple[Any, ...], dict[str, Any]], None]


def _stand_in(layer: torch.nn.Module, sink: Sink, last: bool) -> torch.nn.Module:
    import torch

    class StandIn(torch.nn.Module):
        """Records its call and returns the hidden state unchanged; attributes are the real layer's (the model
        reads e.g. ``attention_type`` off each layer to pick its mask)."""

        def __init__(self) -> None:
            super().__init__()
            object.__setattr__(self, "_real", layer)

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(object.__getattribute__(self, "_real"), name)

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            sink(hidden_states, args, kwargs)
            if last:
                raise _Stop
            return hidden_states

    return StandIn()


def _output(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple | list) else value


class PassEngine:
    """Runs layer-major passes over one loaded causal LM (see the module docstring)."""

    def __init__(self, model: PreTrainedModel, family: Family, placement: Placement | None = None) -> None:
        from shortgpt_serve.placement import Resident

        self.model, self.family = model, family
        self.placement = placement or Resident(model, family)
        *base_path, self._layers_attr = family.layers_module.split(".")
        if not base_path:
            raise ModelError(f"{family.model_type}: the decoder layers must live inside a base model.")
        self._base_path = base_path
        self.num_layers = len(decoder_layers(model, family))
        self._slim_logits = accepts_logits_to_keep(model)

    @classmethod
    def of(cls, model: PreTrainedModel) -> PassEngine:
        """An engine over a loaded model of a supported family, with its weights where they are."""
        from shortgpt_serve.models.families import FAMILIES, supported_types

        model_type = getattr(model.config, "model_type", None)
        if model_type not in FAMILIES:
            raise ModelError(f"model_type {model_type!r} is not supported; supported model types: {supported_types()}.")
        return cls(model, FAMILIES[model_type])

    @property
    def device(self) -> torch.device:
        return self.placement.device

    def _parent(self, path: list[str]) -> Any:
        obj: Any = self.model
        for part in path:
            obj = getattr(obj, part)
        return obj

    @property
    def base(self) -> torch.nn.Module:
        """The base model (embeddings, decoder layers, final norm) inside the causal LM."""
        module: torch.nn.Module = self._parent(self._base_path)
        return module

    @property
    def custom_masks(self) -> bool:
        """Whether the model's attention takes a custom 4D pattern as it takes its own masks (SDPA and eager
        attention do; the model passes a prepared 4D mask through unchanged)."""
        return getattr(self.model.config, "_attn_implementation", None) in ("sdpa", "eager")

    def _custom_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """``allowed`` in the form the model's attention reads: boolean for SDPA, additive for eager."""
        import torch

        if not self.custom_masks:
            raise ModelError("this model's attention implementation takes no custom attention pattern.")
        if self.model.config._attn_implementation == "sdpa":
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def state_bytes(self, batches: Sequence[Batch]) -> int:
        """Bytes of one set of hidden states at a layer boundary for ``batches``."""
        config = self.model.config
        hidden = int(getattr(config, "hidden_size", 0) or config.get_text_config().hidden_size)
        size = next(self.model.parameters()).element_size()
        return sum(int(b.input_ids.numel()) for b in batches) * hidden * size

    def routes_per_walk(self, batches: Sequence[Batch]) -> int:
        """How many routes one walk may carry: each distinct route prefix holds one set of states per boundary
        (and a layer's output beside its input while it runs); at most half the device's free memory goes to them.
        """
        free = self.placement.free_bytes()
        if free is None:
            return 1 << 30
        return max(1, free // 2 // max(1, self.state_bytes(batches)) - 1)

    # --- capture ---------------------------------------------------------------------------------------------

    def _capture(self, batch: Batch) -> _Captured:
        import torch

        base = self.base
        layers = getattr(base, self._layers_attr)
        record: _Captured | None = None
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        def sink(hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            nonlocal record
            if record is None:
                record = _Captured(hidden)
            calls.append((args, kwargs))

        stand_ins = torch.nn.ModuleList(
            [_stand_in(layer, sink, i == len(layers) - 1) for i, layer in enumerate(layers)]
        )
        setattr(base, self._layers_attr, stand_ins)
        kwargs: dict[str, Any] = {"attention_mask": batch.attention_mask.to(self.device)}
        if batch.allowed is not None:
            kwargs["attention_mask"] = self._custom_mask(batch.allowed.to(self.device))
        if batch.position_ids is not None:
            kwargs["position_ids"] = batch.position_ids.to(self.device)
        try:
            base(input_ids=batch.input_ids.to(self.device), use_cache=False, **kwargs)
        except _Stop:
            pass
        finally:
            setattr(base, self._layers_attr, layers)
        if record is None or len(calls) != len(layers):
            raise ModelError(
                f"{self.family.model_type}: the model called {len(calls)} of its {len(layers)} decoder layers; "
                "this family's forward is not supported by the pass engine."
            )
        record.calls = calls
        return record

    def capture(self, batch: Batch) -> tuple[torch.Tensor, list[tuple[tuple[Any, ...], dict[str, Any]]]]:
        """The embedded states of ``batch`` and, per decoder layer, the arguments the model calls it with (after the
        hidden state), the embeddings brought in by the placement; for code that runs the layers itself."""
        with self.placement.embedding():
            record = self._capture(batch)
        return record.hidden, record.calls

    # --- the pass --------------------------------------------------------------------------------------------

    def run(
        self,
        batches: Sequence[Batch],
        routes: Sequence[Route],
        *,
        progress: str | None = None,
        keep: Iterable[int] = (),
        start: Boundary | None = None,
        stop_after: int | None = None,
    ) -> dict[int, Boundary]:
        """One layer-major pass of ``batches`` along every route (see the module docstring).

        ``progress``: shown with a progress bar over the layers (None: no bar). ``keep``: layer boundaries at
        which to return the full model's states (those entering layer i; L: leaving the last layer), where the
        pass computes them (some route has skipped nothing before). ``start``: resume from such a boundary of an
        earlier pass over the same batches, instead of computing the layers before it again; no route may skip a
        layer before it. ``stop_after``: end the pass after that layer (observers only: no logits).
        """
        import torch
        from tqdm.auto import tqdm

        first = start.layer if start is not None else 0
        for route in routes:
            changed = sorted({*route.skip, *route.replace})
            bad = [i for i in changed if not first <= i < self.num_layers]
            if bad:
                raise ModelError(
                    f"layers {bad} do not exist or come before the pass starts; the model has decoder layers "
                    f"0..{self.num_layers - 1} and this pass starts at {first}."
                )
        if start is not None and len(start.states) != len(batches):
            raise ModelError(f"the boundary holds {len(start.states)} batches' states, not {len(batches)}.")
        kept: dict[int, Boundary] = {}
        if not batches or not routes:
            return kept
        fits = self.routes_per_walk(batches)
        if len(routes) > fits:
            # Too many candidates' states to hold at once: several walks over the weights, each as many as fit.
            for at in range(0, len(routes), fits):
                more = self.run(
                    batches, routes[at : at + fits], progress=progress, keep=keep, start=start, stop_after=stop_after
                )
                kept.update({i: b for i, b in more.items() if i not in kept})
            return kept
        wanted = set(keep)
        full: frozenset[Step] = frozenset()
        with torch.inference_mode():
            with self.placement.embedding():
                captured = [self._capture(b) for b in batches]
            masks = [b.attention_mask.to(self.device) for b in batches]
            # Routes grouped by what they did differently so far; each group shares one list of states.
            trunk = list(start.states) if start is not None else [c.hidden for c in captured]
            branches: dict[frozenset[Step], list[torch.Tensor]] = {full: trunk}
            last = self.num_layers if stop_after is None else min(stop_after + 1, self.num_layers)
            layers = range(first, last)
            bar = tqdm(layers, desc=progress, unit="layer", disable=progress is None, leave=False)
            for i in bar:
                if i in wanted and full in branches:
                    kept[i] = Boundary(i, list(branches[full]))
                with self.placement.layer(i) as layer:
                    nxt: dict[frozenset[Step], list[torch.Tensor]] = {}
                    for so_far, states in branches.items():
                        by_step: dict[Step, list[Route]] = {}
                        for r in routes:
                            if r.path(i) == so_far:
                                by_step.setdefault(r.step(i), []).append(r)
                        for n, (step, members) in enumerate(by_step.items()):
                            mine = states if n == len(by_step) - 1 else list(states)  # the others keep the inputs
                            if step == _SKIP:
                                nxt[so_far | {(i, 0)}] = mine
                                continue
                            module = layer if step == _PLAIN else members[0].replace[i]
                            observers = [o for r in members for o in r.observers]
                            for b, h in enumerate(mine):
                                args, kwargs = captured[b].calls[i]
                                out = _output(module(h, *args, **kwargs))
                                for observe in observers:
                                    observe(i, b, h, out, masks[b])
                                mine[b] = out
                                self.placement.settle()
                            nxt[so_far if step == _PLAIN else so_far | {step}] = mine
                    branches = nxt
            del captured
            if last < self.num_layers:
                return kept
            if self.num_layers in wanted and full in branches:
                kept[self.num_layers] = Boundary(self.num_layers, list(branches[full]))
            readers = [r for r in routes if r.on_logits is not None]
            if readers:
                with self.placement.head() as norm:
                    for path, states in branches.items():
                        group = [r for r in readers if r.path(self.num_layers) == path]
                        for b, h in enumerate(states):
                            if not group:
                                break
                            logits = self._logits(norm, h, batches[b])
                            for r in group:
                                assert r.on_logits is not None
                                r.on_logits(b, logits)
                            del logits  # before the next batch's are computed: one batch's logits at a time
                            self.placement.settle()
        return kept

    def logits(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The causal LM's logits for ``batch`` from given states leaving its last decoder layer (pre-norm), kept
        from an earlier pass: the placement's final norm and head, and the model's own head code."""
        import torch

        with torch.inference_mode(), self.placement.head() as norm:
            return self._logits(norm, hidden.to(self.device), batch)

    def head_logits(self, norm: torch.nn.Module, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The logits from states leaving the last decoder layer, with the final norm ``norm`` a placement's
        ``head()`` gave (held by the caller), under the caller's gradient mode."""
        return self._logits(norm, hidden, batch)

    def _logits(self, norm: torch.nn.Module, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        keep = batch.logits_to_keep if self._slim_logits else 0
        return head_logits(
            self.model, self._parent(self._base_path[:-1]), self._base_path[-1], norm(hidden), batch, keep
        )
