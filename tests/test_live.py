"""The live comparison on sampled real requests (serving/live.py) and the shadow proxy in front of vLLM
(serving/shadow.py).

Without engines: reading replies as they stream, agreement, exact match, length ratio, the saving, sampling and
drops, the settings, and the proxy's own answers (/health before the engine is ready, an engine or a shadow that
cannot be reached). Slow: the proxy wired as the launcher wires it in front of the session's shortened default model,
with the full default model on a second real engine as its shadow, called with the official `openai` client.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

from shortgpt_serve.config import ServeConfig
from shortgpt_serve.errors import ConfigError
from shortgpt_serve.serving.live import (
    LiveComparison,
    LiveMetrics,
    Reply,
    ReplyReader,
    compare,
    is_greedy,
    prefix_agreement,
)
from shortgpt_serve.serving.shadow import ProxyServer, ShadowProxy, ShadowTarget, redact
from tests.conftest import free_port
from tests.serving import API_KEY, NAME, Launcher, http_status

FULL_NAME = "SmolLM2-135M-Instruct"
SHADOW_KEY = "shadow-key-456"


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def sample_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


# --- Without engines ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("short", "full", "expected"),
    [
        ("", "", 1.0),
        ("abc", "abc", 1.0),
        ("abcd", "abXY", 0.5),
        ("xbc", "abc", 0.0),
        ("ab", "abcd", 0.5),  # a prefix of the other: the rest counts as disagreement
        ("abcd", "ab", 0.5),
        ("", "abc", 0.0),
    ],
)
def test_prefix_agreement(short: str, full: str, expected: float) -> None:
    assert prefix_agreement(short, full) == expected


def test_streamed_completion_read_across_arbitrary_cuts() -> None:
    """Chunk boundaries fall anywhere (mid-line, mid-JSON); TTFT is the first chunk with content, tokens come from
    usage when the stream carries it."""
    body = sse(
        {"choices": [{"index": 0, "text": ""}]},
        {"choices": [{"index": 0, "text": "Hello"}]},
        {"choices": [{"index": 1, "text": "other choice"}]},
        {"choices": [{"index": 0, "text": " world"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}},
    )
    first_content = body.index(b"Hello")
    reader = ReplyReader(stream=True, chat=False, start=10.0)
    cuts = [5, first_content + 3, first_content + 40, len(body) - 4, len(body)]
    last = 0
    for i, cut in enumerate(cuts):
        reader.feed(body[last:cut], 11.0 + i)
        last = cut
    reply = reader.finish(20.0)
    assert reply == Reply("Hello world", 7, 10.0, 3.0)  # the "Hello" event's line ends in the third piece, at 13.0
    assert reply.tpot_s == pytest.approx((10.0 - 3.0) / 6)


def test_streamed_chat_without_usage_counts_content_chunks() -> None:
    body = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {"choices": [{"index": 0, "delta": {"content": " there"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    )
    reader = ReplyReader(stream=True, chat=True, start=0.0)
    reader.feed(body, 0.5)
    reply = reader.finish(1.0)
    assert reply is not None and (reply.text, reply.output_tokens, reply.ttft_s) == ("Hi there", 2, 0.5)


def test_whole_bodies_and_bodies_that_are_not_completions() -> None:
    chat = ReplyReader(stream=False, chat=True, start=0.0)
    chat.feed(b'{"choices": [{"index": 0, "message": {"content": "Yes."}}], "usage": {"completion_tokens": 2}}', 1)
    reply = chat.finish(3.0)
    assert reply == Reply("Yes.", 2, 3.0, None) and reply.tpot_s is None
    for bad in (b'{"error": {"message": "no"}}', b"not json", b""):
        reader = ReplyReader(stream=False, chat=False, start=0.0)
        reader.feed(bad, 1.0)
        assert reader.finish(1.0) is None


def test_compare_exact_match_length_ratio_and_saving() -> None:
    full = Reply("The cat sat on the mat.", 8, 2.0, 0.2)
    same = compare(Reply("The cat sat on the mat.", 8, 1.5, 0.1), full, greedy=True)
    assert (same.exact_match, same.agreement, same.length_ratio) == (True, 1.0, 1.0)
    assert same.saving == pytest.approx(0.25)
    differs = compare(Reply("The cat sat down.", 4, 0.5, 0.1), full, greedy=True)
    assert differs.exact_match is False and differs.agreement == pytest.approx(12 / 23)
    assert differs.length_ratio == 0.5
    assert differs.saving == pytest.approx(1 - (0.5 / 4) / (2.0 / 8))  # per output token: 0.5 faster
    sampled = compare(Reply("anything", 4, 1.0, None), full, greedy=False)
    assert (sampled.exact_match, sampled.agreement, sampled.length_ratio) == (None, None, 0.5)
    assert compare(Reply("", 0, 1.0, None), Reply("", 0, 1.0, None), greedy=True).length_ratio is None


@pytest.mark.parametrize(
    ("body", "greedy"),
    [({"temperature": 0}, True), ({"temperature": 0.0}, True), ({"temperature": 0.7}, False), ({}, False)],
)
def test_is_greedy(body: dict[str, Any], greedy: bool) -> None:
    assert is_greedy(body) is greedy
    assert is_greedy({"temperature": False}) is False  # a JSON boolean is not a temperature


def test_sampling_follows_the_fraction_and_drops_beyond_the_slots() -> None:
    registry = CollectorRegistry()
    draws = iter([0.01, 0.9, 0.02, 0.03, 0.04, 0.5])
    live = LiveComparison(LiveMetrics(registry), fraction=0.1, max_in_flight=2, random_fn=lambda: next(draws))
    admitted = [live.admit() for _ in range(6)]
    assert admitted == [True, False, True, False, False, False]  # the 4th and 5th are sampled but no slot is free
    assert sample_value(registry, "shortgpt_live_sampled_requests_total") == 4
    assert sample_value(registry, "shortgpt_live_shadow_dropped_total", reason="queue_full") == 2
    live.release()
    assert live.in_flight == 1
    never = LiveComparison(LiveMetrics(CollectorRegistry()), fraction=0.0, max_in_flight=2)
    assert not any(never.admit() for _ in range(1000))
    always = LiveComparison(LiveMetrics(CollectorRegistry()), fraction=1.0, max_in_flight=10_000)
    assert all(always.admit() for _ in range(1000))
    seeded = LiveComparison(LiveMetrics(CollectorRegistry()), 0.05, 10_000, random_fn=random.Random(0).random)
    share = sum(seeded.admit() for _ in range(10_000)) / 10_000
    assert 0.04 < share < 0.06


def test_record_exports_each_comparison() -> None:
    registry = CollectorRegistry()
    live = LiveComparison(LiveMetrics(registry), fraction=1.0, max_in_flight=4)
    full = Reply("abcd", 4, 2.0, 0.5)
    live.record(Reply("abcd", 4, 1.0, 0.25), full, greedy=True)
    live.record(Reply("abXY", 2, 1.0, 0.25), full, greedy=True)
    live.record(Reply("zz", 8, 1.0, None), full, greedy=False)
    assert live.record(None, full, greedy=True) is None
    assert live.record(Reply("a", 1, 1.0, None), None, greedy=True) is None
    v = lambda name, **labels: sample_value(registry, name, **labels)  # noqa: E731
    assert v("shortgpt_live_compared_requests_total", greedy="true") == 2
    assert v("shortgpt_live_compared_requests_total", greedy="false") == 1
    assert v("shortgpt_live_exact_matches_total") == 1
    assert v("shortgpt_live_prefix_agreement_ratio_count") == 2
    assert v("shortgpt_live_prefix_agreement_ratio_sum") == pytest.approx(1.5)
    assert v("shortgpt_live_output_length_ratio_sum") == pytest.approx(1 + 0.5 + 2)
    assert v("shortgpt_live_latency_saving_ratio_count") == 3
    assert v("shortgpt_live_e2e_latency_seconds_count", model="full") == 3
    assert v("shortgpt_live_e2e_latency_seconds_sum", model="shortened") == 3.0
    assert v("shortgpt_live_ttft_seconds_count", model="shortened") == 2  # the unstreamed one has no TTFT
    assert v("shortgpt_live_tpot_seconds_count", model="full") == 3
    assert v("shortgpt_live_tpot_seconds_count", model="shortened") == 2
    assert v("shortgpt_live_shadow_dropped_total", reason="primary_incomplete") == 1


def test_metrics_exist_at_zero_from_the_start() -> None:
    registry = CollectorRegistry()
    LiveMetrics(registry)
    text = generate_latest(registry).decode()
    for line in (
        'shortgpt_live_ttft_seconds_count{model="full"} 0.0',
        'shortgpt_live_e2e_latency_seconds_count{model="shortened"} 0.0',
        'shortgpt_live_compared_requests_total{greedy="true"} 0.0',
        'shortgpt_live_shadow_errors_total{reason="timeout"} 0.0',
        'shortgpt_live_shadow_dropped_total{reason="queue_full"} 0.0',
        "shortgpt_live_prefix_agreement_ratio_count 0.0",
    ):
        assert line in text, line


@pytest.mark.parametrize(
    ("given", "flag"),
    [
        ({"shadow_fraction": 1.5}, "--shadow-fraction"),
        ({"shadow_fraction": -0.1}, "--shadow-fraction"),
        ({"shadow_fraction": float("nan")}, "--shadow-fraction"),
        ({"shadow_url": "full-model:8000"}, "--shadow-url"),
        ({"shadow_url": "ftp://full:8000"}, "--shadow-url"),
        ({"shadow_model": " "}, "--shadow-model"),
        ({"shadow_timeout": 0.0}, "serve.shadow_timeout"),
        ({"shadow_max_in_flight": 0}, "serve.shadow_max_in_flight"),
    ],
)
def test_bad_shadow_settings(given: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError) as err:
        ServeConfig(**given).validate()
    assert err.value.param == flag and flag in err.value.message


def test_shadow_flags_on_the_command_line(tmp_path: Path) -> None:
    from shortgpt_serve.cli import cli

    bad = CliRunner().invoke(cli, ["show-config", "--shadow-fraction", "2"])  # type: ignore[arg-type]
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines()[-1] == (
        "Error: --shadow-fraction must be a share between 0 and 1 (e.g. 0.05 for 5% of requests), got 2.0."
    )
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text("serve:\n  shadow_url: http://full:8000\n  shadow_fraction: 0.25\n  shadow_timeout: 30\n")
    good = CliRunner().invoke(
        cli,  # type: ignore[arg-type]
        ["show-config", "--config", str(yaml_file), "--shadow-fraction", "0.5"],
        env={"SHORTGPT_SERVE_SHADOW_API_KEY": "secret-shadow-key"},
    )
    assert good.exit_code == 0, good.output
    assert "http://full:8000" in good.output and "0.5" in good.output and "secret-shadow-key" not in good.output


def test_shadow_target_and_redaction() -> None:
    assert ShadowTarget.of("http://full:8000/v1/", "", None, 5.0) == ShadowTarget("http://full:8000", None, None, 5.0)
    assert redact("https://user:pw@full.example:8443/v1") == "https://full.example:8443/v1"


@pytest.fixture
def closed_port_proxy() -> Iterator[tuple[ProxyServer, CollectorRegistry]]:
    """The proxy in front of a port nothing listens on, with a shadow on another such port, sampling everything."""
    registry = CollectorRegistry()
    live = LiveComparison(LiveMetrics(registry), fraction=1.0, max_in_flight=4)
    shadow = ShadowTarget(f"http://127.0.0.1:{free_port()}", None, "m", 5.0)
    server = ProxyServer(ShadowProxy(f"http://127.0.0.1:{free_port()}", shadow, live), "127.0.0.1", free_port())
    server.start()
    try:
        yield server, registry
    finally:
        server.stop()


def test_proxy_health_is_503_until_ready_and_unreachable_engines_are_counted(
    closed_port_proxy: tuple[ProxyServer, CollectorRegistry],
) -> None:
    server, registry = closed_port_proxy
    base = f"http://127.0.0.1:{server.port}"
    assert http_status(f"{base}/health") == 503
    server.proxy.ready = True
    assert http_status(f"{base}/health") == 503  # ready, but the engine does not answer: still not healthy
    assert http_status(f"{base}/v1/models") == 502
    req = urllib.request.Request(
        f"{base}/v1/completions",
        data=json.dumps({"model": "x", "prompt": "hi", "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(req, timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code == 502
    server.run_in_loop(server.proxy.drain(), 10)
    assert sample_value(registry, "shortgpt_live_shadow_errors_total", reason="connection") == 1
    assert sample_value(registry, "shortgpt_live_shadow_dropped_total", reason="primary_incomplete") == 1
    assert server.proxy.live is not None and server.proxy.live.in_flight == 0


def test_front_with_proxy_moves_the_engine_to_a_private_port(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from shortgpt_serve.config.serving import SHADOW_API_KEY_ENV
    from shortgpt_serve.errors import ServeError
    from shortgpt_serve.serving.launch import front_with_proxy

    monkeypatch.setenv(SHADOW_API_KEY_ENV, "the-shadow-key")
    cfg = ServeConfig(port=free_port(), api_key="k1", shadow_url="http://127.0.0.1:9/v1", shadow_fraction=0.5)
    engine_cfg, proxy = front_with_proxy(cfg, LiveMetrics(CollectorRegistry()))
    try:
        assert (engine_cfg.host, engine_cfg.api_key) == ("127.0.0.1", "k1") and engine_cfg.port != cfg.port
        assert proxy.proxy.upstream == f"http://127.0.0.1:{engine_cfg.port}"
        assert proxy.proxy.shadow == ShadowTarget("http://127.0.0.1:9", "the-shadow-key", None, 120.0)
        assert proxy.proxy.live is not None and proxy.proxy.live.fraction == 0.5
        assert http_status(f"http://127.0.0.1:{cfg.port}/health") == 503
    finally:
        proxy.stop()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = dataclasses.replace(cfg, port=busy.getsockname()[1])
        with pytest.raises(ServeError) as err:
            front_with_proxy(taken, LiveMetrics(CollectorRegistry()))
    assert err.value.param == "--port" and "already in use" in err.value.message


# --- Slow: two real engines ----------------------------------------------------------------------------------


@pytest.fixture
def full_engine(
    server: Launcher, session_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Path]]:
    """The full default model on its own vLLM engine beside the session server (the shortened one), with its own
    API key and a small KV cache; (base URL, its log)."""
    from shortgpt_serve.models.source import resolve_model
    from shortgpt_serve.serving.serve import start_engine

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    full_dir = resolve_model(None, session_cache).path
    cfg = ServeConfig(port=free_port(), api_key=SHADOW_KEY)
    log = tmp_path / "full-engine.log"
    engine = start_engine(full_dir, cfg, FULL_NAME, log_path=log)
    try:
        engine.wait_ready(600)
        yield engine.base_url, log
    finally:
        engine.stop(20)


@pytest.mark.slow
def test_shadow_compares_live_requests_with_the_full_model(  # type: ignore[no-untyped-def]
    server: Launcher, full_engine: tuple[str, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy requests through the proxy, streamed and not, completions and chat: each answer is what the
    shortened model's vLLM gives directly, every request is compared with the full model's answer, and neither
    prompt nor completion text appears in any log or metrics."""
    import logging
    import uuid

    from openai import OpenAI

    from shortgpt_serve.serving.launch import front_with_proxy
    from shortgpt_serve.serving.metrics import LauncherMetrics

    caplog.set_level(logging.DEBUG)
    full_url, full_log = full_engine
    metrics = LauncherMetrics()
    live = LiveMetrics(metrics.registry)
    cfg = ServeConfig(port=free_port(), shadow_url=f"{full_url}/v1", shadow_fraction=1.0)
    monkeypatch.setenv("SHORTGPT_SERVE_SHADOW_API_KEY", SHADOW_KEY)
    _, proxy = front_with_proxy(cfg, live)
    proxy.proxy.upstream = server.base_url  # in front of the session's shortened engine instead of a fresh one
    try:
        base = f"http://127.0.0.1:{cfg.port}"
        assert http_status(f"{base}/health") == 503  # not ready until the launcher says so
        proxy.proxy.ready = True
        assert http_status(f"{base}/health") == 200
        assert http_status(f"{base}/v1/models") == 401  # the engine's own answer: the key is required
        assert http_status(f"{base}/v1/models", {"Authorization": f"Bearer {API_KEY}"}) == 200
        assert "vllm:" in urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()

        marker = f"marker-{uuid.uuid4().hex}"
        via, direct = (OpenAI(base_url=f"{u}/v1", api_key=API_KEY, timeout=120) for u in (base, server.base_url))
        prompt = f"{marker} Once upon a time"
        messages = [{"role": "user", "content": f"Repeat this: {marker}"}]
        args = {"max_tokens": 24, "temperature": 0}
        answers = []
        for c in (via, direct):
            text = c.completions.create(model=NAME, prompt=prompt, **args).choices[0].text  # type: ignore[call-overload]
            streamed = "".join(
                e.choices[0].text
                for e in c.completions.create(model=NAME, prompt=prompt, stream=True, **args)  # type: ignore[call-overload]
                if e.choices
            )
            chat = c.chat.completions.create(model=NAME, messages=messages, **args).choices[0].message.content  # type: ignore[call-overload]
            chat_streamed = "".join(
                e.choices[0].delta.content or ""
                for e in c.chat.completions.create(model=NAME, messages=messages, stream=True, **args)  # type: ignore[call-overload]
                if e.choices
            )
            answers.append([text, streamed, chat, chat_streamed])
        assert answers[0] == answers[1]  # through the proxy, the client gets what vLLM answers
        assert all(len(a) >= 20 for a in answers[0]), answers[0]
        proxy.run_in_loop(proxy.proxy.drain(), 120)

        v = lambda name, **labels: metrics.registry.get_sample_value(name, labels)  # noqa: E731
        assert v("shortgpt_live_sampled_requests_total") == 4
        assert v("shortgpt_live_compared_requests_total", greedy="true") == 4
        assert v("shortgpt_live_shadow_errors_total", reason="connection") == 0
        assert v("shortgpt_live_shadow_errors_total", reason="status") == 0
        for model in ("full", "shortened"):
            assert v("shortgpt_live_e2e_latency_seconds_count", model=model) == 4
            assert v("shortgpt_live_ttft_seconds_count", model=model) == 2  # the streamed two
            assert v("shortgpt_live_tpot_seconds_count", model=model) == 2
            assert 0 < v("shortgpt_live_e2e_latency_seconds_sum", model=model) < 4 * 120
        agreement = v("shortgpt_live_prefix_agreement_ratio_sum") / v("shortgpt_live_prefix_agreement_ratio_count")
        assert v("shortgpt_live_prefix_agreement_ratio_count") == 4 and 0 <= agreement <= 1
        assert 0 <= v("shortgpt_live_exact_matches_total") <= 4
        assert v("shortgpt_live_output_length_ratio_count") == 4
        assert 0 < v("shortgpt_live_output_length_ratio_sum") / 4 <= 4  # max_tokens caps both at 24
        assert v("shortgpt_live_latency_saving_ratio_count") == 4
        # The full model answered the same prompts: its engine counted them.
        full_metrics = urllib.request.urlopen(f"{full_url}/metrics", timeout=5).read().decode()
        served = sum(
            float(line.rsplit(" ", 1)[1])
            for line in full_metrics.splitlines()
            if line.startswith("vllm:request_success_total{") and f'model_name="{FULL_NAME}"' in line
        )
        assert served == 4
        full_client = OpenAI(base_url=f"{full_url}/v1", api_key=SHADOW_KEY, timeout=120)
        full_answer = full_client.completions.create(model=FULL_NAME, prompt=prompt, **args).choices[0].text  # type: ignore[call-overload]
        assert len(full_answer.strip()) >= 20

        time.sleep(2)  # let the engines' output reach their logs
        places = {
            "shortened engine and launcher output": server.output(),
            "full engine output": full_log.read_text(errors="replace"),
            "proxy log records": "\n".join(r.getMessage() for r in caplog.records),
            "launcher metrics": generate_latest(metrics.registry).decode(),
            "full engine metrics": full_metrics,
            "metrics through the proxy": urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode(),
        }
        for where, text in places.items():
            assert marker not in text, where
            assert SHADOW_KEY not in text, where
            for answer in [*answers[0], full_answer]:
                assert answer.strip() not in text, where
    finally:
        proxy.stop()
