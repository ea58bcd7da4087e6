"""The benchmark workload and what its client measures (no engine: the real one runs in tests/test_serve.py)."""

from __future__ import annotations

import dataclasses

import pytest

from shortgpt_serve.config import BenchmarkConfig
from shortgpt_serve.serving.workload import RequestResult, Workload, _sse_events, summarize


def test_sse_events_split_across_reads() -> None:
    events, rest = _sse_events(b'data: {"a": 1}\n\ndata: {"b"')
    assert events == ['{"a": 1}'] and rest == b'data: {"b"'
    events, rest = _sse_events(rest + b": 2}\n\ndata: [DONE]\n\n")
    assert events == ['{"b": 2}', "[DONE]"] and rest == b""


def test_summarize_measures_what_the_client_saw() -> None:
    # Two requests of 5 tokens: first token after 0.1 s / 0.3 s, then one token every 0.05 s / 0.1 s.
    a = RequestResult(ok=True, start=0.0, ttft=0.1, e2e=0.3, output_tokens=5, itl=[0.05] * 4)
    b = RequestResult(ok=True, start=0.0, ttft=0.3, e2e=0.7, output_tokens=5, itl=[0.1] * 4)
    failed = RequestResult(ok=False, start=0.0, error="HTTP 500: boom")
    s = summarize([a, b, failed], duration=2.0, concurrency=2)
    assert s.requests == 3 and s.failed == 1 and s.errors == ("HTTP 500: boom",) and s.concurrency == 2
    assert s.output_tokens == 10
    assert s.output_tokens_per_s == pytest.approx(5.0)
    assert s.requests_per_s == pytest.approx(1.0)
    assert s.ttft_s["0.5"] == pytest.approx(0.2)
    assert s.ttft_s["mean"] == pytest.approx(0.2)
    assert s.tpot_s["0.5"] == pytest.approx((0.05 + 0.1) / 2)  # (e2e - ttft) / (tokens - 1)
    assert s.itl_s["0.99"] == pytest.approx(0.1)
    assert s.e2e_s["0.9"] == pytest.approx(0.3 + 0.9 * 0.4)


def test_workload_is_fixed_and_seeded() -> None:
    cfg = BenchmarkConfig(concurrency=(1, 16), prompt_tokens=12)
    w = Workload.from_config(cfg, vocab_size=49152)
    assert w.requests == (8, 64)
    p = w.prompts(3)
    assert p == w.prompts(3) and len(p) == 3 and all(len(x) == 12 for x in p)
    assert all(1000 <= t < 49152 for x in p for t in x)
    assert Workload.from_config(dataclasses.replace(cfg, seed=1), 49152).prompts(3) != p
    assert Workload.from_config(dataclasses.replace(cfg, requests=5), 49152).requests == (5, 5)
