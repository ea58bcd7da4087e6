"""The live comparison: the shortened model's reply to a real request beside the full model's reply to the same one.

The shadow middleware in vLLM's API server (serving/shadow.py) feeds each model's response bytes to a
:class:`ReplyReader` as they pass, then hands both replies to :meth:`LiveComparison.record`, which exports
``shortgpt_live_*`` metrics. Texts live in memory only until the comparison is made; metrics carry counts, timings
and ratios, never text.

Texts are compared as the servers return them (the ``text`` of a completion, the ``content`` of a chat message,
choice 0), character by character: token ids are not in a response unless the client asked for log
probabilities, and the shadow does not change what the client asked for.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Summary

FULL = "full"
SHORTENED = "shortened"
MODEL_LABEL = "model"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
AGREEMENT_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)
LENGTH_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)
ERROR_REASONS = ("timeout", "connection", "status")
"""Why a shadow request failed: no answer in time, no connection (or one cut), a non-200 status."""
DROP_REASONS = ("queue_full", "primary_incomplete")
"""Why a sampled request was not compared: too many shadow requests in flight already, or the shortened model's
reply did not complete (an error status, or a client that went away)."""


class LiveMetrics:
    """The ``shortgpt_live_*`` collectors, registered on the registry given (vLLM's, in its API server). Every
    label value is created up front, so the series exist (at zero) from the first scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        models = [MODEL_LABEL]
        self.ttft = Histogram(
            "shortgpt_live_ttft_seconds",
            "Time to the first streamed chunk with content, per model, on the same sampled live request.",
            models,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "shortgpt_live_e2e_latency_seconds",
            "End-to-end latency per model on the same sampled live request (send to last byte).",
            models,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "shortgpt_live_tpot_seconds",
            "Time per output token after the first, per model, on the same sampled streamed live request.",
            models,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        # A summary (count and sum), not a histogram: a saving can be negative, and a histogram with negative
        # buckets exports no sum, so no mean.
        self.saving = Summary(
            "shortgpt_live_latency_saving_ratio",
            "Per sampled live request: 1 - the shortened model's end-to-end latency per output token / the full "
            "model's (0.2 = 20% faster); compare with shortgpt_latency_saving_ratio measured at startup.",
            registry=r,
        )
        self.agreement = Histogram(
            "shortgpt_live_prefix_agreement_ratio",
            "Per greedy (temperature 0) sampled live request: share of the longer output text before the first "
            "character where the shortened and the full model differ (1 = identical).",
            buckets=AGREEMENT_BUCKETS,
            registry=r,
        )
        self.length_ratio = Histogram(
            "shortgpt_live_output_length_ratio",
            "Per sampled live request: output tokens of the shortened model / the full model's.",
            buckets=LENGTH_BUCKETS,
            registry=r,
        )
        self.sampled = Counter(
            "shortgpt_live_sampled_requests", "Live requests sampled to be sent to the full model too.", registry=r
        )
        self.compared = Counter(
            "shortgpt_live_compared_requests",
            "Sampled live requests both models answered and that were compared; greedy='true' for temperature 0.",
            ["greedy"],
            registry=r,
        )
        self.exact = Counter(
            "shortgpt_live_exact_matches",
            "Greedy sampled live requests whose output text was the same from both models.",
            registry=r,
        )
        self.errors = Counter(
            "shortgpt_live_shadow_errors",
            "Shadow requests to the full model that failed; reason='timeout', 'connection' or 'status'.",
            ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            "shortgpt_live_shadow_dropped",
            "Sampled live requests not compared; reason='queue_full' (too many shadow requests in flight) or "
            "'primary_incomplete' (the shortened model's reply did not complete).",
            ["reason"],
            registry=r,
        )
        for label in (FULL, SHORTENED):
            for h in (self.ttft, self.e2e, self.tpot):
                h.labels(label)
        for greedy in ("true", "false"):
            self.compared.labels(greedy)
        for reason in ERROR_REASONS:
            self.errors.labels(reason)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)


@dataclass(frozen=True)
class Reply:
    """One model's reply to a request as the shadow saw it. ``text`` is kept only until the comparison."""

    text: str
    output_tokens: int
    """The reply's usage.completion_tokens, or, when it carries none, the streamed chunks with content (vLLM
    sends one per step)."""
    e2e_s: float
    ttft_s: float | None
    """Streamed replies only: time to the first chunk with content."""

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class ReplyReader:
    """Reads one OpenAI completions or chat completions response from its bytes as they arrive (SSE when
    streamed, one JSON body when not)."""

    stream: bool
    chat: bool
    start: float
    _buffer: bytearray = field(default_factory=bytearray)
    _parts: list[str] = field(default_factory=list)
    _chunks: int = 0
    _usage: int | None = None
    _first: float | None = None

    def feed(self, data: bytes, now: float) -> None:
        self._buffer += data
        if not self.stream:
            return
        *lines, rest = bytes(self._buffer).split(b"\n")
        self._buffer = bytearray(rest)
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                continue
            with contextlib.suppress(ValueError):
                self._take(json.loads(payload), now)

    def finish(self, now: float) -> Reply | None:
        """The reply once its last byte has arrived; None when its body is not a completion."""
        if not self.stream:
            try:
                body = json.loads(bytes(self._buffer))
            except ValueError:
                return None
            if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
                return None
            self._take(body, now)
        text = "".join(self._parts)
        tokens = self._usage if self._usage is not None else self._chunks
        return Reply(text, tokens, now - self.start, self._first - self.start if self._first is not None else None)

    def _take(self, body: Any, now: float) -> None:
        if not isinstance(body, dict):
            return
        usage = body.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self._usage = usage["completion_tokens"]
        for choice in body.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            text = _choice_text(choice, self.chat, self.stream)
            if text:
                self._parts.append(text)
                self._chunks += 1
                if self.stream and self._first is None:
                    self._first = now


def _choice_text(choice: dict[str, Any], chat: bool, stream: bool) -> str:
    if not chat:
        text = choice.get("text")
    else:
        message = choice.get("delta" if stream else "message")
        text = message.get("content") if isinstance(message, dict) else None
    return text if isinstance(text, str) else ""


def is_greedy(body: dict[str, Any]) -> bool:
    """Whether a request asks for greedy decoding (temperature 0), so both models should answer alike."""
    t = body.get("temperature")
    return isinstance(t, (int, float)) and not isinstance(t, bool) and t == 0


def prefix_agreement(short: str, full: str) -> float:
    """Share of the longer text before the first character where the two differ (1.0 for equal texts)."""
    longest = max(len(short), len(full))
    if longest == 0:
        return 1.0
    same = next((i for i, (a, b) in enumerate(zip(short, full, strict=False)) if a != b), min(len(short), len(full)))
    return same / longest


@dataclass(frozen=True)
class Compared:
    """What one sampled request showed."""

    greedy: bool
    exact_match: bool | None
    """Greedy requests only."""
    agreement: float | None
    """Greedy requests only: :func:`prefix_agreement`."""
    length_ratio: float | None
    saving: float | None
    """1 - the shortened model's latency per output token / the full model's."""


def compare(short: Reply, full: Reply, greedy: bool) -> Compared:
    length = short.output_tokens / full.output_tokens if full.output_tokens else None
    saving = None
    if short.output_tokens and full.output_tokens and full.e2e_s > 0:
        saving = 1.0 - (short.e2e_s / short.output_tokens) / (full.e2e_s / full.output_tokens)
    if not greedy:
        return Compared(False, None, None, length, saving)
    return Compared(True, short.text == full.text, prefix_agreement(short.text, full.text), length, saving)


class LiveComparison:
    """Which requests are sampled, how many shadow requests may be in flight, and what each comparison records.

    Used from one event loop (the API server's): no locks."""

    def __init__(
        self,
        metrics: LiveMetrics,
        fraction: float,
        max_in_flight: int,
        random_fn: Callable[[], float] | None = None,
    ) -> None:
        self.metrics = metrics
        self.fraction = fraction
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._random = random_fn or random.Random().random

    def admit(self) -> bool:
        """Whether this request is shadowed: sampled (counted) and a slot free (else counted as dropped). A True
        answer holds a slot until :meth:`release`."""
        if self.fraction <= 0 or self._random() >= self.fraction:
            return False
        self.metrics.sampled.inc()
        if self.in_flight >= self.max_in_flight:
            self.metrics.dropped.labels("queue_full").inc()
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1

    def error(self, reason: str) -> None:
        self.metrics.errors.labels(reason).inc()

    def record(self, short: Reply | None, full: Reply | None, greedy: bool) -> Compared | None:
        """Export one sampled request's comparison; None (and counted) when either reply is missing. A missing
        full reply was counted as an error where it failed."""
        m = self.metrics
        if short is None:
            m.dropped.labels("primary_incomplete").inc()
            return None
        if full is None:
            return None
        result = compare(short, full, greedy)
        for label, reply in ((SHORTENED, short), (FULL, full)):
            m.e2e.labels(label).observe(reply.e2e_s)
            if reply.ttft_s is not None:
                m.ttft.labels(label).observe(reply.ttft_s)
            if reply.tpot_s is not None:
                m.tpot.labels(label).observe(reply.tpot_s)
        m.compared.labels("true" if greedy else "false").inc()
        if result.saving is not None:
            m.saving.observe(result.saving)
        if result.length_ratio is not None:
            m.length_ratio.observe(result.length_ratio)
        if result.agreement is not None:
            m.agreement.observe(result.agreement)
        if result.exact_match:
            m.exact.inc()
        return result
