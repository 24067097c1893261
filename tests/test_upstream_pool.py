"""The proxy's upstream connections (:mod:`streams.sidecar.upstream`) against a scripted
loopback origin that counts its connections and answers as each test says: keep-alive
reuse, the per-upstream bound, the timeouts, a kept connection the origin closed, answers
that are informational, chunked, malformed, or to ``HEAD``."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import pytest_asyncio
from yarl import URL

from streams.kafka.broker import free_port
from streams.sidecar.upstream import SUPPORTED, UpstreamConnectError, UpstreamPool

pytestmark = [pytest.mark.asyncio,
              pytest.mark.skipif(not SUPPORTED, reason="this aiohttp has no usable protocol")]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
# (request head and body) -> what to write back, then whether to close the connection
Script = Callable[[bytes, bytes], Awaitable[tuple[bytes, bool]]]


async def ok(head: bytes, body: bytes) -> tuple[bytes, bool]:
    return OK, False


class Origin:
    """A loopback HTTP/1.1 origin: parses request heads (and Content-Length bodies),
    answers with ``script``, counts connections and the most open at once."""

    def __init__(self, script: Script = ok) -> None:
        self.script = script
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> URL:
        return URL(f"http://127.0.0.1:{self.port}/x?q=1")

    async def start(self) -> None:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.writers.add(w)
            self.open += 1
            self.most_open = max(self.most_open, self.open)
            try:
                while True:
                    head = await r.readuntil(b"\r\n\r\n")
                    n = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            n = int(line.split(b":")[1])
                    body = await r.readexactly(n) if n else b""
                    self.requests.append((head, body))
                    out, close = await self.script(head, body)
                    w.write(out)
                    await w.drain()
                    if close:
                        break
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                self.open -= 1
                self.writers.discard(w)
                w.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.writers):
                w.close()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def serving(script: Script = ok) -> AsyncIterator[Origin]:
    """An :class:`Origin` answering with ``script``, stopped on the way out."""
    o = Origin(script)
    await o.start()
    try:
        yield o
    finally:
        await o.stop()


@pytest_asyncio.fixture
async def origin() -> AsyncIterator[Origin]:
    async with serving() as o:
        yield o


@pytest_asyncio.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(per_host=4, connect_timeout_s=2.0, read_timeout_s=2.0)
    yield p
    await p.close()


async def get(pool: UpstreamPool, url: URL, method: str = "GET",
              headers: list[tuple[str, str]] | None = None,
              body: bytes | None = None) -> tuple[int, bytes]:
    resp = await asyncio.wait_for(pool.request(method, url, headers or [], body), 5)
    try:
        return resp.status, await asyncio.wait_for(resp.read(), 5)
    finally:
        resp.release()


async def test_sequential_requests_share_one_kept_connection(origin: Origin,
                                                            pool: UpstreamPool) -> None:
    for _ in range(20):
        assert await get(pool, origin.url) == (200, b"ok")
    assert origin.connections == 1
    head = origin.requests[0][0].decode()
    # the path and query on the request line, Host added when the client sent none
    assert head.startswith("GET /x?q=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{origin.port}\r\n" in head


async def test_client_headers_and_body_go_as_given(origin: Origin, pool: UpstreamPool) -> None:
    await get(pool, origin.url, "POST", [("Host", "api.example"), ("X-A", "1")], b"hello")
    await get(pool, origin.url, "POST")
    (head, body), (head2, body2) = origin.requests
    assert b"Host: api.example\r\n" in head and b"X-A: 1\r\n" in head
    assert b"Content-Length: 5\r\n" in head and body == b"hello"
    assert b"Content-Length: 0\r\n" in head2 and body2 == b""  # an empty POST says so


async def test_a_header_with_a_line_break_is_refused_before_sending(origin: Origin,
                                                                   pool: UpstreamPool) -> None:
    with pytest.raises(ValueError, match="control character"):
        await pool.request("GET", origin.url, [("X-A", "1\r\nX-Injected: 1")])
    assert origin.requests == []
    assert await get(pool, origin.url) == (200, b"ok")  # the bound was not leaked


async def test_at_most_per_host_connections_at_once(pool: UpstreamPool) -> None:
    async def slow(head: bytes, body: bytes) -> tuple[bytes, bool]:
        await asyncio.sleep(0.05)
        return OK, False

    async with serving(slow) as o:
        got = await asyncio.gather(*(get(pool, o.url) for _ in range(12)))
        assert got == [(200, b"ok")] * 12
        assert o.most_open == 4 and o.connections == 4  # per_host=4, then reused


async def test_refused_connection_is_a_connect_error() -> None:
    p = UpstreamPool(per_host=2, connect_timeout_s=2.0, read_timeout_s=2.0)
    try:
        url = URL(f"http://127.0.0.1:{free_port()}/x")
        for _ in range(3):  # a failed connect gives its slot back
            with pytest.raises(UpstreamConnectError, match="cannot connect"):
                await p.request("GET", url, [])
    finally:
        await p.close()


async def test_silent_origin_times_out_on_read() -> None:
    async def silent(head: bytes, body: bytes) -> tuple[bytes, bool]:
        await asyncio.sleep(10)
        return OK, False

    p = UpstreamPool(per_host=2, connect_timeout_s=2.0, read_timeout_s=0.2)
    async with serving(silent) as o:
        try:
            t = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(p.request("GET", o.url, []), 5)
            assert time.monotonic() - t < 2
        finally:
            await p.close()


async def test_kept_connection_closed_by_the_origin_is_retried_once_when_idempotent(
        pool: UpstreamPool) -> None:
    async def drop_second(head: bytes, body: bytes) -> tuple[bytes, bool]:
        if len(o.requests) == 2:
            return b"", True  # the kept connection dies under the second request
        return OK, False

    async with serving(drop_second) as o:
        assert await get(pool, o.url) == (200, b"ok")
        assert await get(pool, o.url) == (200, b"ok")  # sent again, on a new connection
        assert o.connections == 2 and len(o.requests) == 3


async def test_kept_connection_that_breaks_is_not_retried_for_a_post(pool: UpstreamPool) -> None:
    async def drop_second(head: bytes, body: bytes) -> tuple[bytes, bool]:
        if len(o.requests) == 2:
            return b"", True  # took the request, answered nothing
        return OK, False

    async with serving(drop_second) as o:
        assert await get(pool, o.url) == (200, b"ok")
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
            await pool.request("POST", o.url, [], b"x")
        assert len(o.requests) == 2  # sent once, never again


async def test_informational_answers_are_skipped_and_head_has_no_body(pool: UpstreamPool) -> None:
    async def script(head: bytes, body: bytes) -> tuple[bytes, bool]:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", False  # no body
        return (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nnew"), False

    async with serving(script) as o:
        assert await get(pool, o.url) == (201, b"new")
        resp = await asyncio.wait_for(pool.request("HEAD", o.url, []), 5)
        assert resp.status == 200 and resp.content_length == 1000
        assert await resp.read() == b""
        resp.release()
        assert await get(pool, o.url) == (201, b"new")
        assert o.connections == 1  # the HEAD answer left the connection reusable


async def test_chunked_answer_read_whole_and_streamed(pool: UpstreamPool) -> None:
    async def chunked(head: bytes, body: bytes) -> tuple[bytes, bool]:
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"), False

    async with serving(chunked) as o:
        assert await get(pool, o.url) == (200, b"abcdefg")
        resp = await pool.request("GET", o.url, [])
        assert resp.content_length is None
        parts = [c async for c in resp.content.iter_any()]
        resp.release()
        assert b"".join(parts) == b"abcdefg"
        assert o.connections == 1


async def test_unread_body_closes_the_connection(pool: UpstreamPool, origin: Origin) -> None:
    resp = await pool.request("GET", origin.url, [])
    resp.release()  # body left unread: that connection cannot carry another answer
    resp.release()  # twice is harmless
    assert await get(pool, origin.url) == (200, b"ok")
    assert origin.connections in (1, 2)
    # the bound counted each release once: per_host=4 answers at once still work
    assert await asyncio.gather(*(get(pool, origin.url) for _ in range(8))) == [(200, b"ok")] * 8


async def test_an_answer_dropped_without_release_gives_its_slot_back(origin: Origin) -> None:
    p = UpstreamPool(per_host=1, connect_timeout_s=2.0, read_timeout_s=2.0)
    try:
        resp = await p.request("GET", origin.url, [])
        assert resp.status == 200
        del resp
        gc.collect()
        assert await get(p, origin.url) == (200, b"ok")  # waits forever if the slot leaked
    finally:
        await p.close()


async def test_malformed_answer_is_a_payload_error(pool: UpstreamPool) -> None:
    async def junk(head: bytes, body: bytes) -> tuple[bytes, bool]:
        return b"SMTP ready\r\n\r\n", False

    async with serving(junk) as o:
        with pytest.raises(aiohttp.ClientPayloadError, match="malformed answer"):
            await asyncio.wait_for(pool.request("GET", o.url, []), 5)


async def test_idle_connections_are_closed_after_keepalive(origin: Origin) -> None:
    p = UpstreamPool(per_host=2, connect_timeout_s=2.0, read_timeout_s=2.0, keepalive_s=0.3)
    try:
        assert await get(p, origin.url) == (200, b"ok")
        deadline = time.monotonic() + 5
        while origin.open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert origin.open == 0  # the sweeper closed it
        assert await get(p, origin.url) == (200, b"ok")
        assert origin.connections == 2
    finally:
        await p.close()
