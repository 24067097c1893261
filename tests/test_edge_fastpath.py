"""Fresh cache hits answered as requests are parsed (streams/sidecar/fastpath.py), against
a real loopback origin: the same answer as the ordinary path, responses in order when
requests are pipelined (hits, misses and bad requests mixed), the hits counted, and what
must go the ordinary way does."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client import REGISTRY

from streams.sidecar.fastpath import SUPPORTED, FastServer
from streams.sidecar.proxy_plane import ProxyPlane
from tests.edge_helpers import edge_of, edge_sidecar

CACHE = {"cache": {"enabled": True}}
FRESH = {"Cache-Control": "max-age=60", "ETag": '"v1"'}


async def raw_exchange(port: int, data: bytes, answers: int, timeout_s: float = 5.0) -> bytes:
    """Send ``data`` on one connection; read until ``answers`` responses have come."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        got = b""
        async with asyncio.timeout(timeout_s):
            while not _complete(got, answers):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                got += chunk
        return got
    finally:
        writer.close()


def _complete(data: bytes, answers: int) -> bool:
    """Every one of ``answers`` responses has its whole Content-Length body."""
    rest = data
    for _ in range(answers):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            return False
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if len(rest) < length:
            return False
        rest = rest[length:]
    return True


def test_fast_path_is_supported_by_the_installed_aiohttp() -> None:
    assert SUPPORTED, "aiohttp's RequestHandler changed: fresh hits lost their fast path"


@pytest.mark.asyncio
async def test_a_fast_hit_answers_as_the_ordinary_path_does() -> None:
    async with edge_sidecar(**CACHE) as (sc, o), aiohttp.ClientSession() as cs:
        assert isinstance(sc.plane, ProxyPlane)
        assert isinstance(sc.plane.proxy.server(), FastServer)
        o.set("/f", headers={**FRESH, "X-Custom": "1", "Age": "2"}, body=b"fresh")
        async with cs.get(f"http://127.0.0.1:{sc.port}/f") as r:
            assert r.headers["X-Cache"] == "MISS"
        async with cs.get(f"http://127.0.0.1:{sc.port}/f") as r:
            fast = (r.status, await r.read(), r.headers.copy())
        # a priority header sends the same hit the ordinary way
        async with cs.get(f"http://127.0.0.1:{sc.port}/f",
                          headers={"X-Loadcast-Priority": "5"}) as r:
            slow = (r.status, await r.read(), r.headers.copy())
        assert o.hits["/f"] == 1
        assert fast[:2] == slow[:2] == (200, b"fresh")
        assert fast[2]["X-Cache"] == slow[2]["X-Cache"] == "HIT"
        assert sorted(fast[2].keys()) == sorted(slow[2].keys())
        for k in fast[2]:
            if k != "Age":
                assert fast[2].getall(k) == slow[2].getall(k), k
        assert 2 <= int(fast[2]["Age"]) <= int(slow[2]["Age"]) <= 4  # the origin's Age too
        assert sc.plane.proxy.edge is not None
        assert sc.plane.proxy.edge.cache.fast_hits.get("orders", 0) >= 1
    hits = REGISTRY.get_sample_value("loadcast_sidecar_cache_total",
                                     {"sidecar": sc.id, "api": "orders", "result": "hit"})
    assert hits is not None and hits >= 2  # the fast hit counted at close


@pytest.mark.asyncio
async def test_pipelined_requests_are_answered_in_order() -> None:
    async with edge_sidecar(**CACHE) as (sc, o), aiohttp.ClientSession() as cs:
        o.set("/hit", headers=FRESH, body=b"HIT-BODY")
        o.set("/miss", headers={}, body=b"MISS-BODY", delay_s=0.05)
        async with cs.get(f"http://127.0.0.1:{sc.port}/hit") as r:
            await r.read()
        req = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"
        # idle connection: hit (fast), miss (ordinary, slow origin), hit (must wait)
        data = req % b"/hit" + req % b"/miss" + req % b"/hit" + req % b"/hit"
        got = await raw_exchange(sc.port, data, 4)
        bodies = [p.split(b"\r\n\r\n", 1)[1][:9] for p in got.split(b"HTTP/1.1 ")[1:]]
        assert bodies == [b"HIT-BODY", b"MISS-BODY", b"HIT-BODY", b"HIT-BODY"]
        assert o.hits["/miss"] == 1 and o.hits["/hit"] == 1
        # a chunk aiohttp cannot parse gets its 400 (as without the fast path), no hit
        bad = req % b"/hit" + b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n"
        got = await raw_exchange(sc.port, bad, 1)
        assert got.startswith(b"HTTP/1.0 400 Bad Request\r\n") and b"HIT-BODY" not in got


@pytest.mark.asyncio
async def test_what_the_fast_path_leaves_to_the_ordinary_path() -> None:
    async with edge_sidecar(**CACHE, compression={"enabled": True, "min_bytes": 10}) \
            as (sc, o), aiohttp.ClientSession() as cs:
        edge = edge_of(sc)
        o.set("/f", headers=FRESH, body=b"f")
        o.set("/big", headers={**FRESH, "Content-Type": "application/json"}, body=b"{}" * 100)
        for path in ("/f", "/big"):
            async with cs.get(f"http://127.0.0.1:{sc.port}{path}") as r:
                await r.read()
        before = dict(edge.cache.fast_hits)
        # the client's own validator: a 304, from the ordinary path
        async with cs.get(f"http://127.0.0.1:{sc.port}/f",
                          headers={"If-None-Match": '"v1"'}) as r:
            assert r.status == 304
        # credentials, no-cache: ordinary path (no-cache revalidates with the origin)
        async with cs.get(f"http://127.0.0.1:{sc.port}/f",
                          headers={"Authorization": "Bearer x"}) as r:
            assert r.status == 200
        async with cs.get(f"http://127.0.0.1:{sc.port}/f",
                          headers={"Cache-Control": "no-cache"}) as r:
            assert r.headers["X-Cache"] == "REVALIDATED"
        # a compressible body: negotiated per client on the ordinary path
        async with cs.get(f"http://127.0.0.1:{sc.port}/big",
                          headers={"Accept-Encoding": "gzip"}) as r:
            assert r.headers["Content-Encoding"] == "gzip" and r.headers["X-Cache"] == "HIT"
            assert "Accept-Encoding" in r.headers["Vary"]
        assert edge.cache.fast_hits == before
        # and a plain one again takes the fast path
        async with cs.get(f"http://127.0.0.1:{sc.port}/f") as r:
            assert r.headers["X-Cache"] == "HIT"
        assert edge.cache.fast_hits.get("orders", 0) == before.get("orders", 0) + 1


@pytest.mark.asyncio
async def test_a_key_whose_answer_was_not_storable_is_relayed_for_a_while() -> None:
    async with edge_sidecar(**CACHE) as (sc, o), aiohttp.ClientSession() as cs:
        edge = edge_of(sc)
        o.set("/p", headers={}, body=b"p")
        for _ in range(2):
            async with cs.get(f"http://127.0.0.1:{sc.port}/p") as r:
                assert r.headers["X-Cache"] == "MISS" and await r.read() == b"p"
        assert o.hits["/p"] == 2 and ("orders", "/p") in edge.cache.passing
        o.set("/p", headers=FRESH, body=b"p")
        async with cs.get(f"http://127.0.0.1:{sc.port}/p") as r:
            assert r.headers["X-Cache"] == "MISS"  # still relayed: not stored yet
        edge.cache.passing[("orders", "/p")] = (0.0, "no-lifetime")  # PASS_S is over
        for want in ("MISS", "HIT"):
            async with cs.get(f"http://127.0.0.1:{sc.port}/p") as r:
                assert r.headers["X-Cache"] == want
        assert o.hits["/p"] == 4 and ("orders", "/p") not in edge.cache.passing
    assert REGISTRY.get_sample_value(
        "loadcast_sidecar_cache_not_stored_total",
        {"sidecar": sc.id, "api": "orders", "reason": "no-lifetime"}) == 3


async def exchange_each(port: int, chunks: list[bytes | float]) -> bytes:
    """Send ``chunks`` on one connection as separate writes, 50 ms apart (so each arrives
    as its own chunk; a number is a pause of that many seconds); whatever came back
    within a second after the last."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        for chunk in chunks:
            if isinstance(chunk, float):
                await asyncio.sleep(chunk)
                continue
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.05)
        try:
            async with asyncio.timeout(1.0):
                while data := await reader.read(65536):
                    got += data
        except TimeoutError:
            pass
        return got
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_repeated_request_bytes_are_answered_as_if_parsed_again() -> None:
    async with edge_sidecar(**CACHE) as (sc, o):
        o.set("/hit", headers={"Cache-Control": "max-age=1"}, body=b"OLD-BODY")
        req = b"GET /hit HTTP/1.1\r\nHost: x\r\n\r\n"
        got = await exchange_each(sc.port, [req] * 4)
        assert got.count(b"OLD-BODY") == 4 and got.count(b"X-Cache: HIT") == 3
        # on one connection: the repeated bytes answered, then (the stored answer expired,
        # the origin changed) the same bytes again: the request is kept, its answer is not
        o.set("/hit", headers={"Cache-Control": "max-age=1"}, body=b"OLD-BODY")
        task = asyncio.create_task(exchange_each(sc.port, [req, req, req, 1.2, req, req]))
        await asyncio.sleep(0.9)
        o.set("/hit", headers={"Cache-Control": "max-age=60"}, body=b"NEW-BODY")
        got = await task
        assert got.count(b"OLD-BODY") == 3 and got.count(b"NEW-BODY") == 2
        assert got.index(b"NEW-BODY") > got.rindex(b"OLD-BODY")
        # a head split over two chunks leaves the parser mid-message: bytes that were a
        # whole request before are now the rest of another one (a header's value here),
        # never a hit of their own
        o.set("/other", headers={}, body=b"OTHER")
        part = b"GET /other HTTP/1.1\r\nX-Trace: "
        got = await exchange_each(sc.port, [req, req, part, req])
        assert got.count(b"NEW-BODY") == 2 and got.count(b"OTHER") == 1
        assert got.index(b"OTHER") > got.rindex(b"NEW-BODY")
        assert o.hits["/other"] == 1
