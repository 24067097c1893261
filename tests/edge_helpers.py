"""A scriptable loopback origin for the edge tests: per-path responses set by the test,
requests counted (with the headers they came with)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web

from streams.sidecar.app import Sidecar
from streams.sidecar.config import SidecarSettings
from streams.sidecar.edge import Edge
from streams.sidecar.proxy_plane import ProxyPlane
from streams.sidecar.testing import start_site


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"hello"
    delay_s: float = 0.0


class Origin:
    """One in-process origin on 127.0.0.1 (a real socket, a real HTTP server)."""

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.hits: Counter[str] = Counter()
        self.seen: list[dict[str, str]] = []
        self.version = 1
        self.url = ""
        self._runner: web.AppRunner | None = None

    def set(self, path: str, **kw: Any) -> None:
        self.replies[path] = Reply(**kw)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = request.path_qs
        self.hits[key] += 1
        self.seen.append(dict(request.headers))
        r = self.replies.get(key) or self.replies.get(request.path) or Reply()
        if r.delay_s:
            await asyncio.sleep(r.delay_s)
        etag = r.headers.get("ETag")
        if etag and request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={k: v for k, v in r.headers.items()
                                                     if k != "Content-Type"})
        lm = r.headers.get("Last-Modified")
        if lm and request.headers.get("If-Modified-Since") == lm:
            return web.Response(status=304, headers=r.headers)
        body = r.body
        if "Vary" in r.headers and "X-Lang" in r.headers["Vary"]:
            body = body + b"-" + request.headers.get("X-Lang", "none").encode()
        return web.Response(status=r.status, body=body, headers=r.headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, port = await start_site(app)
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


_ids = itertools.count()


@asynccontextmanager
async def edge_sidecar(**settings: Any) -> AsyncIterator[tuple[Sidecar, Origin]]:
    """A sidecar without Kafka in front of one scriptable origin."""
    origin = Origin()
    await origin.start()
    base: dict[str, Any] = {
        "upstreams": [{"id": "o1", "url": origin.url, "api": "orders"}],
        "listen_port": 0, "admin_port": 0, "region": "eu-west",
    }
    base.update(settings)
    sc = Sidecar(SidecarSettings(**base), None, sidecar_id=f"edge-{next(_ids)}")
    await sc.start()
    try:
        yield sc, origin
    finally:
        await sc.stop()
        await origin.stop()


def edge_of(sc: Sidecar) -> Edge:
    """The built-in proxy's edge (cache, compression, limits) of a running sidecar."""
    edge = cast(ProxyPlane, sc.plane).proxy.edge
    assert edge is not None
    return edge
