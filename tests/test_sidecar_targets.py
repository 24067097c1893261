"""The sidecar is not an open proxy: whatever the request target (absolute-form, ``//host``,
CONNECT, odd forms), no request reaches a host outside its upstreams. A "forbidden"
server on 127.0.0.1 counts every connection it gets; it must get none. Both data planes:
the built-in proxy and a real HAProxy with the generated config."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from streams.kafka.broker import free_port
from streams.sidecar.config import SidecarSettings, Upstream
from streams.sidecar.haproxy import HAProxyProcess, haproxy_binary, render_config
from streams.sidecar.proxy import Proxy, serve
from streams.sidecar.router import Router
from streams.sidecar.testing import BackendProcess


class Forbidden:
    """A TCP server that must never be contacted: counts connections and bytes."""

    def __init__(self) -> None:
        self.connections = 0
        self.data = b""
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                self.data += await asyncio.wait_for(r.read(4096), 1.0)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\n"
                        b"forbidden")
                await w.drain()
            except (TimeoutError, ConnectionError):
                pass
            finally:
                w.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def raw_request(port: int, line: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """Send one request line as written (no client normalization); (status, body)."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        w.write(f"{line}\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await w.drain()
        data = await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


@pytest.fixture
def backends() -> Iterator[BackendProcess]:
    with BackendProcess({"a": 0}) as b:
        yield b


@pytest_asyncio.fixture
async def forbidden() -> AsyncIterator[Forbidden]:
    f = Forbidden()
    await f.start()
    try:
        yield f
    finally:
        await f.stop()


def attacks(fp: int) -> list[str]:
    """Request lines aimed at the forbidden server on port ``fp``."""
    return [
        f"GET http://127.0.0.1:{fp}/x HTTP/1.1",
        f"GET http://localhost:{fp}/x?y=1 HTTP/1.1",
        f"GET https://127.0.0.1:{fp}/x HTTP/1.1",
        f"GET http://u:p@127.0.0.1:{fp}/x HTTP/1.1",
        f"POST http://127.0.0.1:{fp}/x HTTP/1.1",
        f"GET HTTP://127.0.0.1:{fp} HTTP/1.1",
        f"CONNECT 127.0.0.1:{fp} HTTP/1.1",
        f"GET //127.0.0.1:{fp}/x HTTP/1.1",
        f"GET ///127.0.0.1:{fp}/x HTTP/1.1",
        f"GET /\\127.0.0.1:{fp}/x HTTP/1.1",
        f"GET /..//127.0.0.1:{fp}/x HTTP/1.1",
        f"GET /%2F%2F127.0.0.1:{fp}/x HTTP/1.1",
        f"GET 127.0.0.1:{fp}/x HTTP/1.1",
        f"GET http:127.0.0.1:{fp}/x HTTP/1.1",
        "OPTIONS * HTTP/1.1",
    ]


@pytest.mark.asyncio
async def test_proxy_never_contacts_a_host_outside_its_upstreams(
    backends: BackendProcess, forbidden: Forbidden
) -> None:
    router = Router([Upstream(id="a", url=backends.urls["a"])], policy="first-available")
    proxy = Proxy(router, sidecar_id="t")
    await proxy.open()
    runner, port = await serve(proxy.server(), "127.0.0.1", 0)
    try:
        fp = forbidden.port
        got = {line: await raw_request(port, line, host=f"127.0.0.1:{fp}")
               for line in attacks(fp)}
        assert forbidden.connections == 0, (forbidden.data, got)
        # absolute-form naming a host that is not an upstream: 400; CONNECT: 405
        for line, (status, body) in got.items():
            if line.startswith("CONNECT"):
                assert status == 405, (line, status, body)
            elif not line.split()[1].startswith("/"):
                assert status == 400, (line, status, body)  # ours (JSON) or aiohttp's
            else:  # a path, however odd: it goes to the upstream, on the upstream's host
                assert status == 200 and body == b"a", (line, status, body)
        # absolute-form that names the configured upstream is accepted, path and query kept
        up = backends.urls["a"]
        status, body = await raw_request(port, f"GET {up}/big?kb=1 HTTP/1.1",
                                         host=up.removeprefix("http://"))
        assert status == 200 and len(body) == 1024
        status, body = await raw_request(port, "GET /big?kb=2 HTTP/1.1")
        assert status == 200 and len(body) == 2048
        assert forbidden.connections == 0
    finally:
        await runner.cleanup()
        await proxy.close()


def test_ipv6_upstream_url_is_bracketed() -> None:
    u = Upstream(id="v6", url="http://[::1]:9001")
    assert u.url == "http://[::1]:9001"
    assert (u.host, u.port) == ("::1", 9001)
    assert Upstream(id="v4", url="http://127.0.0.1:9001/").url == "http://127.0.0.1:9001"


@pytest.mark.skipif(haproxy_binary() is None, reason="haproxy binary not installed")
@pytest.mark.asyncio
async def test_haproxy_config_never_contacts_a_host_outside_its_upstreams(
    backends: BackendProcess, forbidden: Forbidden, tmp_path: Path
) -> None:
    settings = SidecarSettings(upstreams=[{"id": "a", "url": backends.urls["a"]}])
    port = free_port()
    sock = tmp_path / "admin.sock"
    proc = HAProxyProcess(render_config(settings.resolved_upstreams(), bind=f"127.0.0.1:{port}",
                                        socket_path=sock, check=False), workdir=tmp_path)
    proc.start(sock)
    try:
        fp = forbidden.port
        got = {line: await raw_request(port, line, host=f"127.0.0.1:{fp}")
               for line in attacks(fp)}
        assert forbidden.connections == 0, (forbidden.data, got)
        for line, (status, body) in got.items():
            target = line.split()[1]
            if line.startswith("CONNECT"):
                assert status == 405, (line, status)
            elif not target.startswith("/"):
                assert status == 400, (line, status, body)
            elif "\\" not in target:  # HAProxy itself refuses a backslash (400)
                assert status == 200 and body == b"a", (line, status, body)
        up = backends.urls["a"]
        status, body = await raw_request(port, f"GET {up}/big?kb=1 HTTP/1.1",
                                         host=up.removeprefix("http://"))
        assert status == 200 and len(body) == 1024
        assert forbidden.connections == 0
    finally:
        proc.stop()
