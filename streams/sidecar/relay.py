"""The built-in proxy's two ends toward the upstreams: the pooled client session, and
relaying an upstream's answer back to the client (small bodies whole, others streamed;
compressed with a coding when :mod:`streams.sidecar.edge` chose one)."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from streams.sidecar.compression import compress, compressor
from streams.sidecar.upstream import SUPPORTED as POOL_SUPPORTED
from streams.sidecar.upstream import Answer, UpstreamPool

MAX_READ_WHOLE = 256 << 10  # responses up to 256 KiB are read in one go


def upstream_session(pool_size: int, connect_timeout_s: float,
                     request_timeout_s: float) -> aiohttp.ClientSession:
    """The pooled keep-alive client session to the upstreams."""
    conn = aiohttp.TCPConnector(
        limit=0, limit_per_host=pool_size, keepalive_timeout=30,
        ttl_dns_cache=None, enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=conn,
        auto_decompress=False,  # pass compression through untouched
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=request_timeout_s,
        ),
    )


class Upstreams:
    """Both ways to the upstreams, opened and closed together: at most ``pool_size``
    connections to one upstream on each way (see :meth:`send`)."""

    def __init__(self, pool_size: int, connect_timeout_s: float,
                 request_timeout_s: float) -> None:
        self.session = upstream_session(pool_size, connect_timeout_s, request_timeout_s)
        self.pool = UpstreamPool(pool_size, connect_timeout_s, request_timeout_s) \
            if POOL_SUPPORTED else None

    async def send(self, method: str, url: URL, headers: list[tuple[str, str]],
                   body: Any) -> Answer:
        """Send a request; its answer's head. A body in memory (bytes or None) to an http
        upstream goes through the lean pool; a streamed body, https, or an aiohttp the pool
        cannot drive, through the session."""
        if self.pool is not None and (body is None or isinstance(body, bytes)) \
                and url.scheme == "http":
            return await self.pool.request(method, url, headers, body)
        return await self.session.request(method, url, headers=headers, data=body,
                                          allow_redirects=False)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        await self.session.close()


async def relay(request: web.BaseRequest, resp: Answer,
                headers: CIMultiDict[str], coding: str | None) -> web.StreamResponse:
    """Send ``resp`` back to the client: small bodies whole, others streamed; compressed
    with ``coding`` when given."""
    n = resp.content_length
    if n is not None and n <= MAX_READ_WHOLE:
        data = await resp.read()
        if coding is not None:
            data = compress(data, coding)
            headers["Content-Encoding"] = coding
        return web.Response(status=resp.status, reason=resp.reason, body=data, headers=headers)
    z = compressor(coding) if coding is not None else None
    if coding is not None:
        headers["Content-Encoding"] = coding
    out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
    if z is None and n is not None:
        out.content_length = n
    await out.prepare(request)
    async for chunk in resp.content.iter_any():
        await out.write(z.compress(chunk) if z is not None else chunk)
    if z is not None:
        await out.write(z.flush())
    await out.write_eof()
    return out
