"""The shadow proxy: the public port in front of vLLM when a full-model endpoint is given to compare with.

Every request is forwarded to the engine on its private loopback port unchanged (method, path, query, headers
including Authorization, body) and its response comes back unchanged (status, headers, body bytes as they stream).
A sampled share of completions and chat completions is also sent to the full model in the background; its reply
never reaches the client and never holds the client's response back. Both replies go to the live comparison
(serving/live.py). ``/health`` answers 503 until the engine is ready, and whenever it is not.

Starlette on uvicorn serves the public side (in a thread with its own event loop); aiohttp talks to both engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from shortgpt_serve.errors import ServeError
from shortgpt_serve.serving.live import LiveComparison, Reply, ReplyReader, is_greedy

log = logging.getLogger(__name__)

SHADOWED = {"/v1/completions": False, "/v1/chat/completions": True}
"""Paths whose requests may be sampled, and whether each is the chat API."""
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
REQUEST_DROPPED = HOP_BY_HOP | {"content-length"}  # set again for the body as forwarded
START_TIMEOUT_S = 30.0


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


def redact(url: str) -> str:
    """``url`` without any user name or password in it, for messages."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class _ShadowFailed(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class ShadowProxy:
    """The ASGI app: forwards to ``upstream``; mirrors sampled requests to ``shadow`` when both it and ``live``
    are given."""

    def __init__(self, upstream: str, shadow: ShadowTarget | None, live: LiveComparison | None) -> None:
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.upstream = upstream.rstrip("/")
        self.shadow = shadow
        self.live = live if shadow is not None else None
        self.ready = False
        """Set by the launcher while the engine answers /health."""
        self._session: Any = None
        self._shadow_model: str | None = shadow.model if shadow else None
        self._tasks: set[asyncio.Task[None]] = set()
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=methods)], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        import aiohttp

        # Raw bytes both ways (no decompression, no headers added), no limit on connections or time: the client's
        # own timeouts apply, as they would against vLLM itself.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        try:
            yield
        finally:
            for task in list(self._tasks):
                task.cancel()
            await self._session.close()

    async def _handle(self, request: Any) -> Any:
        import aiohttp
        from starlette.responses import Response, StreamingResponse
        from yarl import URL

        path = request.url.path
        if path == "/health" and not self.ready:
            return Response(status_code=503)
        body = await request.body()
        sampled = self._sample(request.method, path, body)
        raw_path = request.scope.get("raw_path") or path.encode()
        query = request.scope.get("query_string") or b""
        url = URL(
            self.upstream + raw_path.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else ""), encoded=True
        )
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in REQUEST_DROPPED]
        start = time.perf_counter()
        primary: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()
        reader = None
        if sampled is not None:
            reader = ReplyReader(sampled["stream"], sampled["chat"], start)
            self._spawn(self._mirror(sampled, primary))
        try:
            upstream = await self._session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            )
        except (aiohttp.ClientError, OSError):
            _resolve(primary, None)
            return Response(status_code=503 if path == "/health" else 502)
        out_headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP]
        ok = upstream.status == 200

        async def relay() -> AsyncIterator[bytes]:
            complete = False
            try:
                async for chunk in upstream.content.iter_any():
                    if reader is not None:
                        reader.feed(chunk, time.perf_counter())
                    yield chunk
                complete = True
            finally:
                upstream.release()
                reply = reader.finish(time.perf_counter()) if reader is not None and complete and ok else None
                _resolve(primary, reply)

        response = StreamingResponse(relay(), status_code=upstream.status)
        response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in out_headers]
        return response

    def _sample(self, method: str, path: str, body: bytes) -> dict[str, Any] | None:
        """The request's JSON and how to read it when it is to be mirrored; None when it is not."""
        if self.live is None or method != "POST" or path not in SHADOWED or not self.live.admit():
            return None
        try:
            payload = json.loads(body)  # parsed only once sampled: unsampled requests pass untouched
        except ValueError:
            payload = None
        if not isinstance(payload, dict):  # vLLM answers it with an error; nothing to compare
            self.live.release()
            return None
        return {"payload": payload, "stream": payload.get("stream") is True, "chat": SHADOWED[path], "path": path}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mirror(self, sampled: dict[str, Any], primary: asyncio.Future[Reply | None]) -> None:
        assert self.live is not None and self.shadow is not None
        live, target = self.live, self.shadow
        try:
            full: Reply | None = None
            try:
                full = await asyncio.wait_for(self._ask_shadow(sampled), target.timeout_s)
            except asyncio.TimeoutError:
                live.error("timeout")
            except _ShadowFailed as exc:
                live.error(exc.reason)
            except Exception as exc:  # refused, reset or cut mid-stream: never the client's problem
                log.debug("shadow request failed: %s", type(exc).__name__)
                live.error("connection")
            try:
                # A response never started (the client left first) never resolves its future.
                short = await asyncio.wait_for(asyncio.shield(primary), target.timeout_s)
            except asyncio.TimeoutError:
                short = None
            live.record(short, full, is_greedy(sampled["payload"]))
        finally:
            live.release()

    async def _ask_shadow(self, sampled: dict[str, Any]) -> Reply:
        assert self.shadow is not None
        target = self.shadow
        headers = {"Content-Type": "application/json"}
        if target.api_key:
            headers["Authorization"] = f"Bearer {target.api_key}"
        model = await self._model_of_shadow(headers)
        # The client's request as it is but for the model's name, so both replies count tokens the same way
        # (usage when the client asked for it, else streamed chunks).
        payload = {**sampled["payload"], "model": model}
        start = time.perf_counter()
        reader = ReplyReader(sampled["stream"], sampled["chat"], start)
        async with self._session.post(
            target.url + sampled["path"], data=json.dumps(payload).encode(), headers=headers
        ) as r:
            if r.status != 200:
                raise _ShadowFailed("status")
            async for chunk in r.content.iter_any():
                reader.feed(chunk, time.perf_counter())
        reply = reader.finish(time.perf_counter())
        if reply is None:
            raise _ShadowFailed("status")
        return reply

    async def _model_of_shadow(self, headers: dict[str, str]) -> str:
        if self._shadow_model is None:
            assert self.shadow is not None
            async with self._session.get(f"{self.shadow.url}/v1/models", headers=headers) as r:
                if r.status != 200:
                    raise _ShadowFailed("status")
                models = (await r.json(content_type=None)).get("data") or []
            if not models:
                raise _ShadowFailed("status")
            self._shadow_model = str(models[0]["id"])
        return self._shadow_model

    async def drain(self) -> None:
        """Wait for the shadow requests in flight (tests and benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _resolve(future: asyncio.Future[Reply | None], reply: Reply | None) -> None:
    if not future.done():
        future.set_result(reply)


class ProxyServer:
    """A :class:`ShadowProxy` served by uvicorn on ``host:port`` in a daemon thread."""

    def __init__(self, proxy: ShadowProxy, host: str, port: int) -> None:
        import uvicorn

        self.proxy = proxy
        self.port = port
        self._socket = _bind(host, port)
        config = uvicorn.Config(
            proxy.app,
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=2,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="shadow-proxy", daemon=True
        )

    def start(self) -> ProxyServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServeError("the proxy in front of vLLM did not start; the launcher's log above says why.")
            time.sleep(0.02)
        return self

    def run_in_loop(self, coro: Any, timeout: float) -> Any:
        """Run a coroutine on the proxy's event loop (e.g. :meth:`ShadowProxy.drain`) and wait for its result."""
        loop = self._loop()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def _loop(self) -> asyncio.AbstractEventLoop:
        for server in self._server.servers:
            return server.get_loop()
        raise ServeError("the proxy is not running")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._socket.close()


def _bind(host: str, port: int) -> socket.socket:
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ServeError(
            f"--port {port} on {host} is already in use ({exc.strerror}); stop what uses it or pass another --port.",
            param="--port",
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock
