"""The built-in proxy's keep-alive connections to its upstreams, driven by aiohttp's own
client protocol without ``ClientSession``.

Why: ``ClientSession.request`` does much per request that a proxy does not need (a request
object, a response object, tracing, cookie and URL handling, the connector's bookkeeping).
With the answer read whole, the session costs 2.1x the CPU of this pool per exchange (57
against 28 µs, ``python benchmarks/upstream.py``, medians of 5 rounds), and the proxy
serves twice the requests per CPU-second with the pool (``python benchmarks/proxy.py
--only cores``: 10.8k against 5.1k). :class:`UpstreamPool` keeps aiohttp's connection
protocol (``aiohttp.client_proto.ResponseHandler``: its C response parser, read timeouts,
payload streams, errors) and header serializer, and replaces only the per-request
machinery with what a reverse proxy needs: a request line and headers as they came, a body
that is already in memory, the answer's head and its payload stream.

What it does as ``ClientSession`` did for the proxy: at most ``per_host`` connections to one
upstream at a time (others wait), idle connections kept ``keepalive_s``, a connect timeout
(:class:`UpstreamConnectError`: nothing was sent), a read timeout per socket read
(``aiohttp.SocketTimeoutError``, a ``TimeoutError``), informational (1xx) answers skipped,
``HEAD`` answers without a body, and one retry on a fresh connection when a *reused* one
turns out to be closed (idempotent methods only). The exceptions are aiohttp's:
``ServerDisconnectedError`` / ``ClientOSError`` when the connection broke after sending,
``ClientPayloadError`` for a body that broke off.

Streamed request bodies (unknown or large length) are not its business: the proxy sends
those through ``ClientSession``. It uses aiohttp names that are not public API, checked at
import (:data:`SUPPORTED`); without them the proxy uses ``ClientSession`` for everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

try:  # aiohttp internals this module drives (see the module docstring)
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.http_exceptions import HttpProcessingError
    from aiohttp.http_writer import _serialize_headers
    from aiohttp.streams import StreamReader

    _PARAMS = inspect.signature(ResponseHandler.set_response_params).parameters
    SUPPORTED = all(p in _PARAMS for p in ("skip_payload", "auto_decompress", "read_timeout")) \
        and all(hasattr(ResponseHandler, n) for n in ("read", "should_close", "start_timeout",
                                                      "is_connected", "close",
                                                      "writing_paused", "_drain_helper"))
except (ImportError, AttributeError, ValueError, TypeError):  # pragma: no cover
    SUPPORTED = False

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # an empty body says Content-Length: 0
# methods that may be sent twice (RFC 9110 9.2.2): the proxy's retry rule and the pool's
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class Answer(Protocol):
    """An upstream's answer as the proxy reads it: ``aiohttp.ClientResponse`` or
    :class:`UpstreamResponse`."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def content(self) -> StreamReader: ...
    async def read(self) -> bytes: ...
    def release(self) -> Any: ...


class UpstreamConnectError(aiohttp.ClientConnectionError):
    """No connection to the upstream (refused, unreachable, timed out): nothing was sent."""


class _Headers:
    """A header list as aiohttp's serializer reads a mapping (``items()``)."""

    __slots__ = ("_h",)

    def __init__(self, h: list[tuple[str, str]]) -> None:
        self._h = h

    def items(self) -> list[tuple[str, str]]:
        return self._h


class UpstreamResponse:
    """An upstream's answer: its head, and its body as a stream (``content``) or whole
    (:meth:`read`). :meth:`release` gives the connection back (or closes it when the body
    was not read to its end), exactly once."""

    __slots__ = ("_conn", "_host", "content", "headers", "reason", "status")

    def __init__(self, host: _Host, conn: Any, message: Any, payload: StreamReader) -> None:
        self._host: _Host | None = host
        self._conn = conn
        self.status: int = message.code
        self.reason: str | None = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = payload

    @property
    def content_length(self) -> int | None:
        v = self.headers.get("Content-Length")
        return int(v) if v is not None and v.isdigit() else None

    async def read(self) -> bytes:
        """The whole body (a ``ClientPayloadError`` when it broke off)."""
        return await self.content.read()

    def __del__(self) -> None:
        # an answer dropped without release() must not keep its slot of the upstream
        with contextlib.suppress(Exception):
            self.release()

    def release(self) -> None:
        host = self._host
        if host is None:
            return
        self._host = None
        conn = self._conn
        if conn.should_close or not self.content.is_eof():
            conn.close()
            host.done(None)
        else:
            host.done(conn)


class _Host:
    """One upstream's connections: the idle ones (newest last) and a bound on all."""

    __slots__ = ("addr", "host_header", "idle", "slots")

    def __init__(self, addr: tuple[str, int], host_header: str, limit: int) -> None:
        self.addr = addr
        self.host_header = host_header
        self.slots = asyncio.Semaphore(limit)  # connections in use, at most ``limit``
        self.idle: deque[tuple[Any, float]] = deque()

    def done(self, conn: Any | None) -> None:
        """A request's connection is free again (``conn``: to keep; None: closed)."""
        if conn is not None:
            self.idle.append((conn, time.monotonic()))
        self.slots.release()

    def take_idle(self, keepalive_s: float) -> Any | None:
        """The newest idle connection still open and not older than ``keepalive_s``."""
        idle = self.idle
        while idle:
            conn, since = idle.pop()
            if conn.is_connected() and not conn.should_close \
                    and time.monotonic() - since < keepalive_s:
                return conn
            conn.close()
        return None

    def expire(self, keepalive_s: float) -> None:
        """Close idle connections older than ``keepalive_s`` (the oldest are first)."""
        now = time.monotonic()
        idle = self.idle
        while idle and (now - idle[0][1] >= keepalive_s or not idle[0][0].is_connected()):
            idle.popleft()[0].close()


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to upstreams; see the module docstring.

    ``per_host``: connections to one upstream at a time; ``connect_timeout_s``: to open
    one; ``read_timeout_s``: the longest wait for the next bytes of an answer;
    ``keepalive_s``: how long an idle connection is kept.
    """

    def __init__(self, per_host: int, connect_timeout_s: float, read_timeout_s: float,
                 keepalive_s: float = 30.0) -> None:
        self.per_host = per_host
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self._hosts: dict[tuple[str, int], _Host] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def _host(self, url: URL) -> _Host:
        key = (url.raw_host or "", url.port or 80)
        h = self._hosts.get(key)
        if h is None:
            if url.scheme != "http":
                raise ValueError(f"only http:// upstreams go through the pool, got {url}")
            host_header = key[0] if url.is_default_port() else f"{key[0]}:{key[1]}"
            h = self._hosts[key] = _Host(key, host_header, self.per_host)
            self._sweep_later()
        return h

    def _sweep_later(self) -> None:
        if self._sweeper is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(max(1.0, self.keepalive_s / 2), self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        for h in self._hosts.values():
            h.expire(self.keepalive_s)
        self._sweep_later()

    async def _connect(self, host: _Host) -> Any:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: ResponseHandler(loop),
                                                       host.addr[0], host.addr[1])
        except (OSError, TimeoutError) as e:
            why = "timed out" if isinstance(e, TimeoutError) else str(e)
            raise UpstreamConnectError(
                f"cannot connect to {host.addr[0]}:{host.addr[1]}: {why}") from e
        return conn

    async def request(self, method: str, url: URL, headers: Iterable[tuple[str, str]],
                      body: bytes | None = None) -> UpstreamResponse:
        """Send ``method`` ``url`` (only its path and query go on the request line) with
        ``headers`` as given (hop-by-hop and framing headers already removed: this adds
        ``Host`` when missing and ``Content-Length``) and ``body``; the answer's head once
        it is in. Call :meth:`UpstreamResponse.release` when done with it."""
        host = self._host(url)
        hdrs = list(headers)
        if not any(k.lower() == "host" for k, _ in hdrs):
            hdrs.insert(0, ("Host", host.host_header))
        if body is not None or method in _BODY_METHODS:
            hdrs.append(("Content-Length", str(len(body) if body is not None else 0)))
        line = f"{method} {url.raw_path_qs} HTTP/1.1"
        head = _serialize_headers(line, _Headers(hdrs))  # type: ignore[arg-type]
        await host.slots.acquire()
        try:
            return await self._exchange(host, method, head, body)
        except BaseException:
            host.done(None)
            raise

    async def _exchange(self, host: _Host, method: str, head: bytes,
                        body: bytes | None) -> UpstreamResponse:
        conn = host.take_idle(self.keepalive_s)
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._connect(host)
            try:
                conn.set_response_params(skip_payload=method == "HEAD", auto_decompress=False,
                                         read_timeout=self.read_timeout_s)
                transport = conn.transport
                if transport is None:
                    raise aiohttp.ServerDisconnectedError()
                if body:
                    transport.writelines((head, body))
                else:
                    transport.write(head)
                if conn.writing_paused:
                    await conn._drain_helper()
                conn.start_timeout()
                while True:
                    message, payload = await conn.read()
                    # informational answers (100 Continue, 103 Early Hints) come first
                    if not 100 <= message.code <= 199 or message.code == 101:
                        break
                return UpstreamResponse(host, conn, message, payload)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                conn.close()
                # a kept connection the upstream had closed meanwhile: once more, anew
                if not reused or method not in IDEMPOTENT:
                    raise
                reused, conn = False, None
            except HttpProcessingError as e:  # not HTTP: as good as a broken connection
                conn.close()
                raise aiohttp.ClientPayloadError(
                    f"malformed answer from {host.addr[0]}:{host.addr[1]}: {e}") from e
            except BaseException:
                conn.close()
                raise

    async def close(self) -> None:
        """Close every idle connection (answers still being read close on release)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for h in self._hosts.values():
            while h.idle:
                h.idle.popleft()[0].close()
