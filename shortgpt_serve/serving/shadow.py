"""The shadow: a pure ASGI middleware inside vLLM's own API server that mirrors a sampled share of completions to
the full model and compares the two replies.

With ``--shadow-url`` the launcher starts vLLM with ``--middleware shortgpt_serve.serving.shadow.ShadowMiddleware``
and passes the settings in the engine's environment (:func:`shadow_env`; the key stays in
SHORTGPT_SERVE_SHADOW_API_KEY). There is no hop in between: clients talk to vLLM on ``--port`` as without a shadow.

A request that is not sampled costs a path check and one random draw, and goes to vLLM untouched. A sampled
completion or chat completion has its body read and replayed to vLLM unchanged; the response messages are watched
as they are sent, never held back or changed. Once vLLM has accepted the request (status 200, so a request its
API key check refuses never reaches the shadow), the same request goes to the full model in the background
(aiohttp, bounded in flight, with a timeout); both replies go to the live comparison (serving/live.py), whose
``shortgpt_live_*`` metrics are registered on vLLM's Prometheus registry and served on its /metrics.
Prompt and completion texts stay in memory until compared; nothing here logs them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from shortgpt_serve.config.serving import SHADOW_API_KEY_ENV
from shortgpt_serve.errors import ConfigError
from shortgpt_serve.serving.live import LiveComparison, LiveMetrics, Reply, ReplyReader, is_greedy

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MIDDLEWARE = "shortgpt_serve.serving.shadow.ShadowMiddleware"
"""What vLLM's ``--middleware`` is given."""
SHADOWED = {"/v1/completions": False, "/v1/chat/completions": True}
"""Paths whose requests may be sampled, and whether each is the chat API."""
URL_ENV = "SHORTGPT_SERVE_SHADOW_URL"
FRACTION_ENV = "SHORTGPT_SERVE_SHADOW_FRACTION"
MODEL_ENV = "SHORTGPT_SERVE_SHADOW_MODEL"
TIMEOUT_ENV = "SHORTGPT_SERVE_SHADOW_TIMEOUT"
MAX_IN_FLIGHT_ENV = "SHORTGPT_SERVE_SHADOW_MAX_IN_FLIGHT"


@dataclass(frozen=True)
class ShadowTarget:
    """The full-model endpoint requests are mirrored to."""

    url: str
    """Base URL, without a trailing /v1."""
    api_key: str | None
    model: str | None
    """The model name to ask for; None: the first one its /v1/models lists."""
    timeout_s: float

    @staticmethod
    def of(url: str, api_key: str | None, model: str | None, timeout_s: float) -> ShadowTarget:
        base = url.rstrip("/")
        return ShadowTarget(base.removesuffix("/v1"), api_key or None, model, timeout_s)


@dataclass(frozen=True)
class ShadowSettings:
    """What the middleware needs, as the launcher passes it to the engine's process."""

    target: ShadowTarget
    fraction: float
    max_in_flight: int

    @staticmethod
    def from_env(env: Mapping[str, str]) -> ShadowSettings:
        """The settings :func:`shadow_env` wrote; a clear error naming the variable when one is missing or bad."""

        def read(name: str, kind: Callable[[str], Any]) -> Any:
            if not env.get(name):
                raise ConfigError(f"{name} is not set; start vLLM with {MIDDLEWARE} through `shortgpt-serve serve`.")
            try:
                return kind(env[name])
            except ValueError:
                raise ConfigError(f"{name}={env[name]!r} is not a valid {kind.__name__}; fix or unset it.") from None

        target = ShadowTarget.of(
            read(URL_ENV, str), env.get(SHADOW_API_KEY_ENV), env.get(MODEL_ENV) or None, read(TIMEOUT_ENV, float)
        )
        return ShadowSettings(target, read(FRACTION_ENV, float), read(MAX_IN_FLIGHT_ENV, int))


def shadow_env(url: str, fraction: float, model: str | None, timeout_s: float, max_in_flight: int) -> dict[str, str]:
    """The engine's environment for :class:`ShadowMiddleware` (the key is read from SHORTGPT_SERVE_SHADOW_API_KEY,
    already there); MODEL_ENV empty: ask the shadow's /v1/models."""
    return {
        URL_ENV: url,
        FRACTION_ENV: repr(fraction),
        MODEL_ENV: model or "",
        TIMEOUT_ENV: repr(timeout_s),
        MAX_IN_FLIGHT_ENV: str(max_in_flight),
    }


def redact(url: str) -> str:
    """``url`` without any user name or password in it, for messages."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


_process_metrics: LiveMetrics | None = None


def process_metrics() -> LiveMetrics:
    """The live metrics on the registry vLLM serves on /metrics: prometheus_client's global one (vLLM's
    single-API-server default). With several API servers vLLM sets PROMETHEUS_MULTIPROC_DIR before they start;
    then every process's values go to that folder and vLLM's /metrics collects them from there."""
    global _process_metrics
    if _process_metrics is None:
        from prometheus_client import REGISTRY

        _process_metrics = LiveMetrics(REGISTRY)
    return _process_metrics


class _ShadowFailed(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass
class _Sampled:
    payload: dict[str, Any]
    path: str
    stream: bool
    chat: bool


class ShadowMiddleware:
    """The ASGI middleware vLLM adds with ``app.add_middleware`` (so built from ``app`` alone: the settings come
    from the environment and the metrics go to vLLM's registry). Tests pass ``settings`` and ``registry``."""

    def __init__(
        self,
        app: ASGIApp,
        settings: ShadowSettings | None = None,
        registry: CollectorRegistry | None = None,
        random_fn: Callable[[], float] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings if settings is not None else ShadowSettings.from_env(os.environ)
        metrics = LiveMetrics(registry) if registry is not None else process_metrics()
        self.live = LiveComparison(metrics, self.settings.fraction, self.settings.max_in_flight, random_fn)
        self._admit = self.live.admit
        self._model: str | None = self.settings.target.model
        self._session: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in SHADOWED and scope["method"] == "POST" and self._admit():
            await self._tapped(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.app(scope, self._on_shutdown(receive), send)
        else:
            await self.app(scope, receive, send)

    async def _tapped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A sampled request: vLLM gets the same messages and the client the same response, watched on the way."""
        start = time.perf_counter()
        received: list[Message] = []
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return received.pop(0) if received else await receive()

        sampled = _sampled(scope["path"], received)
        if sampled is None:  # not JSON (vLLM answers it with an error) or cut short: nothing to compare
            self._not_compared()
            await self.app(scope, replay, send)
            return
        reader = ReplyReader(sampled.stream, sampled.chat, start)
        primary: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()
        mirrored = False

        async def tap(message: Message) -> None:
            nonlocal mirrored
            kind = message["type"]
            now = time.perf_counter()
            await send(message)  # first: the client's bytes never wait on the comparison
            if kind == "http.response.start":
                if message["status"] == 200:
                    mirrored = True
                    self._spawn(self._mirror(sampled, primary))
            elif kind == "http.response.body" and mirrored:
                reader.feed(message.get("body", b""), now)
                if not message.get("more_body", False):
                    _resolve(primary, reader.finish(time.perf_counter()))

        try:
            await self.app(scope, replay, tap)
        finally:
            _resolve(primary, None)  # no-op once resolved; else the reply did not complete
            if not mirrored:
                self._not_compared()

    def _not_compared(self) -> None:
        self.live.record(None, None, greedy=False)  # counted as primary_incomplete
        self.live.release()

    def _on_shutdown(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.close()
            return message

        return wrapped

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mirror(self, sampled: _Sampled, primary: asyncio.Future[Reply | None]) -> None:
        live, timeout = self.live, self.settings.target.timeout_s
        try:
            full: Reply | None = None
            try:
                full = await asyncio.wait_for(self._ask_shadow(sampled), timeout)
            except asyncio.TimeoutError:
                live.error("timeout")
            except _ShadowFailed as exc:
                live.error(exc.reason)
            except Exception as exc:  # refused, reset or cut mid-stream: never the client's problem
                log.debug("shadow request failed: %s", type(exc).__name__)
                live.error("connection")
            try:
                short = await asyncio.wait_for(asyncio.shield(primary), timeout)
            except asyncio.TimeoutError:
                short = None
            live.record(short, full, is_greedy(sampled.payload))
        finally:
            live.release()

    async def _ask_shadow(self, sampled: _Sampled) -> Reply:
        target = self.settings.target
        session = self._client()
        headers = {"Content-Type": "application/json"}
        if target.api_key:
            headers["Authorization"] = f"Bearer {target.api_key}"
        model = await self._model_of_shadow(headers)
        # The client's request as it is but for the model's name, so both replies count tokens the same way
        # (usage when the client asked for it, else streamed chunks).
        body = json.dumps({**sampled.payload, "model": model}).encode()
        start = time.perf_counter()
        reader = ReplyReader(sampled.stream, sampled.chat, start)
        async with session.post(target.url + sampled.path, data=body, headers=headers) as r:
            if r.status != 200:
                raise _ShadowFailed("status")
            async for chunk in r.content.iter_any():
                reader.feed(chunk, time.perf_counter())
        reply = reader.finish(time.perf_counter())
        if reply is None:
            raise _ShadowFailed("status")
        return reply

    async def _model_of_shadow(self, headers: dict[str, str]) -> str:
        if self._model is None:
            async with self._client().get(f"{self.settings.target.url}/v1/models", headers=headers) as r:
                if r.status != 200:
                    raise _ShadowFailed("status")
                models = (await r.json(content_type=None)).get("data") or []
            if not models:
                raise _ShadowFailed("status")
            self._model = str(models[0]["id"])
        return self._model

    def _client(self) -> Any:
        if self._session is None:
            import aiohttp

            # Created on the server's event loop, on first use; timeouts are per request (asyncio.wait_for).
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
            )
        return self._session

    async def drain(self) -> None:
        """Wait for the shadow requests in flight (tests and benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Abandon the shadow requests in flight and close the client (at the server's shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


def _sampled(path: str, received: list[Message]) -> _Sampled | None:
    """How to read and mirror a sampled request; None when its body is not a whole JSON object."""
    if received[-1]["type"] != "http.request" or received[-1].get("more_body", False):
        return None  # the client went away mid-body
    try:
        payload = json.loads(b"".join(m.get("body", b"") for m in received))
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    return _Sampled(payload, path, payload.get("stream") is True, SHADOWED[path])


def _resolve(future: asyncio.Future[Reply | None], reply: Reply | None) -> None:
    if not future.done():
        future.set_result(reply)
