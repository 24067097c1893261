"""The built-in proxy's response cache (RFC 9111 / RFC 5861) against a real loopback
origin: what is stored, what is served, revalidation, stale serving, single-flight,
credentials, the memory bound and the metrics.

A response that arrives with ``Age`` >= its ``max-age`` is stored already expired: that
is how these tests make stale entries without sleeping."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import aiohttp
import pytest
from prometheus_client import REGISTRY

from streams.sidecar.proxy_plane import ProxyPlane
from tests.edge_helpers import edge_of, edge_sidecar

CACHE = {"cache": {"enabled": True}}


async def get(cs: aiohttp.ClientSession, port: int, path: str,
              **headers: str) -> tuple[int, bytes, Any]:
    async with cs.get(f"http://127.0.0.1:{port}{path}",
                      headers={k.replace("_", "-"): v for k, v in headers.items()}) as r:
        return r.status, await r.read(), r.headers


@pytest.mark.asyncio
async def test_cache_control_decides_what_is_stored() -> None:
    async with edge_sidecar(**CACHE) as (sc, o), aiohttp.ClientSession() as cs:
        o.set("/fresh", headers={"Cache-Control": "max-age=60"}, body=b"f")
        o.set("/shared", headers={"Cache-Control": "max-age=0, s-maxage=60"})
        for p, cc in [("/nostore", "no-store, max-age=60"), ("/private", "private, max-age=60"),
                      ("/nocache", "no-cache, max-age=60")]:
            o.set(p, headers={"Cache-Control": cc})
        o.set("/plain")  # no lifetime at all: the origin did not say cacheable
        o.set("/cookie", headers={"Cache-Control": "max-age=60", "Set-Cookie": "s=1"})
        o.set("/err", status=500, headers={"Cache-Control": "max-age=60"})
        paths = ["/fresh", "/shared", "/nostore", "/private", "/nocache", "/plain", "/cookie",
                 "/err", "/fresh?q=2"]
        first = [await get(cs, sc.port, p) for p in paths]
        second = [await get(cs, sc.port, p) for p in paths]
        assert [h["X-Cache"] for _, _, h in first] == ["MISS"] * len(paths)
        assert {p: h["X-Cache"] for p, (_, _, h) in zip(paths, second, strict=True)} == {
            "/fresh": "HIT", "/shared": "HIT", "/nostore": "MISS", "/private": "MISS",
            "/nocache": "MISS", "/plain": "MISS", "/cookie": "MISS", "/err": "MISS",
            "/fresh?q=2": "HIT"}
        assert second[0][1] == b"f" and int(second[0][2]["Age"]) >= 0
        assert {p: o.hits[p] for p in paths} == {
            "/fresh": 1, "/shared": 1, "/nostore": 2, "/private": 2, "/nocache": 2,
            "/plain": 2, "/cookie": 2, "/err": 2, "/fresh?q=2": 1}
        # POST is never answered from the cache; a request's no-store bypasses it
        async with cs.post(f"http://127.0.0.1:{sc.port}/fresh", data=b"x") as r:
            assert r.status == 200 and "X-Cache" not in r.headers
        _, _, h = await get(cs, sc.port, "/fresh", Cache_Control="no-store")
        assert "X-Cache" not in h and o.hits["/fresh"] == 3
        # a request's no-cache goes to the origin and refreshes the stored copy
        _, _, h = await get(cs, sc.port, "/fresh", Cache_Control="no-cache")
        assert h["X-Cache"] == "MISS" and o.hits["/fresh"] == 4
    text = REGISTRY.get_sample_value("loadcast_sidecar_cache_total",
                                     {"sidecar": sc.id, "api": "orders", "result": "hit"})
    assert text is not None and text >= 3
    assert REGISTRY.get_sample_value(
        "loadcast_sidecar_cache_not_stored_total",
        {"sidecar": sc.id, "api": "orders", "reason": "private"}) == 2


@pytest.mark.asyncio
async def test_vary_keeps_one_variant_per_selecting_header() -> None:
    async with edge_sidecar(**CACHE) as (sc, o), aiohttp.ClientSession() as cs:
        o.set("/v", headers={"Cache-Control": "max-age=60", "Vary": "X-Lang"}, body=b"v")
        got = [(await get(cs, sc.port, "/v", X_Lang=lang))[1] for lang in
               ("en", "fr", "en", "fr", "en")]
        assert got == [b"v-en", b"v-fr", b"v-en", b"v-fr", b"v-en"]
        assert o.hits["/v"] == 2
        o.set("/star", headers={"Cache-Control": "max-age=60", "Vary": "*"})
        for _ in range(2):
            await get(cs, sc.port, "/star")
        assert o.hits["/star"] == 2


@pytest.mark.asyncio
async def test_validators_revalidate_expired_entries() -> None:
    async with edge_sidecar(**CACHE) as (sc, o), aiohttp.ClientSession() as cs:
        expired = {"Cache-Control": "max-age=10", "Age": "20"}
        o.set("/e", headers={**expired, "ETag": '"v1"', "Content-Type": "text/plain"},
              body=b"etag body")
        o.set("/lm", headers={**expired, "Last-Modified": "Tue, 01 Dec 2026 10:00:00 GMT"},
              body=b"lm body")
        for p in ("/e", "/lm"):
            assert (await get(cs, sc.port, p))[2]["X-Cache"] == "MISS"
            status, body, h = await get(cs, sc.port, p)
            assert (status, h["X-Cache"]) == (200, "REVALIDATED")
            assert body == (b"etag body" if p == "/e" else b"lm body")
        conditional = [s for s in o.seen if "If-None-Match" in s or "If-Modified-Since" in s]
        assert len(conditional) == 2
        assert conditional[0]["If-None-Match"] == '"v1"'
        # a client's own matching If-None-Match on a hit gets a 304 from the cache
        o.set("/f", headers={"Cache-Control": "max-age=60", "ETag": '"x"'}, body=b"abc")
        await get(cs, sc.port, "/f")
        status, body, h = await get(cs, sc.port, "/f", If_None_Match='"x"')
        assert (status, body, h["X-Cache"]) == (304, b"", "HIT")


async def _until(pred: Any, timeout_s: float = 3.0) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout_s, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_stale_while_revalidate_serves_stale_and_refreshes_once_behind() -> None:
    async with edge_sidecar(**CACHE) as (sc, o), aiohttp.ClientSession() as cs:
        o.set("/s", headers={"Cache-Control": "max-age=10, stale-while-revalidate=60",
                             "Age": "15"}, body=b"old")
        await get(cs, sc.port, "/s")
        o.set("/s", headers={"Cache-Control": "max-age=60"}, body=b"new", delay_s=0.3)
        t0 = time.monotonic()
        answers = await asyncio.gather(*(get(cs, sc.port, "/s") for _ in range(10)))
        assert time.monotonic() - t0 < 0.3  # nobody waited for the slow origin
        assert {(b, h["X-Cache"]) for _, b, h in answers} == {(b"old", "STALE")}
        await _until(lambda: o.hits["/s"] == 2)
        await asyncio.sleep(0.35)
        _, body, h = await get(cs, sc.port, "/s")
        assert (body, h["X-Cache"]) == (b"new", "HIT")
        assert o.hits["/s"] == 2  # ten stale answers, one background refresh


@pytest.mark.asyncio
async def test_stale_if_error_covers_origin_failures_within_its_window() -> None:
    async with edge_sidecar(**CACHE) as (sc, o), aiohttp.ClientSession() as cs:
        o.set("/x", headers={"Cache-Control": "max-age=10, stale-if-error=60", "Age": "15"},
              body=b"good")
        o.set("/y", headers={"Cache-Control": "max-age=10, stale-if-error=60", "Age": "100"},
              body=b"good")
        o.set("/m", headers={"Cache-Control": "max-age=10, must-revalidate, stale-if-error=60",
                             "Age": "15"}, body=b"good")
        for p in ("/x", "/y", "/m"):
            await get(cs, sc.port, p)
            o.set(p, status=500, body=b"broken")
        assert (await get(cs, sc.port, "/x"))[:2] == (200, b"good")
        assert (await get(cs, sc.port, "/y"))[:2] == (500, b"broken")  # past the window
        assert (await get(cs, sc.port, "/m"))[:2] == (500, b"broken")  # must-revalidate
        await o.stop()  # connection refused: no endpoint answers at all
        status, body, h = await get(cs, sc.port, "/x")
        assert (status, body, h["X-Cache"]) == (200, b"good", "STALE")


@pytest.mark.asyncio
async def test_single_flight_one_origin_request_for_100_concurrent() -> None:
    async with edge_sidecar(**CACHE) as (sc, o), aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200)) as cs:
        o.set("/hot", headers={"Cache-Control": "max-age=10", "Age": "30"}, body=b"v1")
        await get(cs, sc.port, "/hot")  # stored, already expired (no stale serving)
        o.set("/hot", headers={"Cache-Control": "max-age=60"}, body=b"v2", delay_s=0.2)
        answers = await asyncio.gather(*(get(cs, sc.port, "/hot") for _ in range(100)))
        assert {(s, b) for s, b, _ in answers} == {(200, b"v2")}
        assert o.hits["/hot"] == 2  # the first fill, then ONE for the hundred
        o.set("/cold", headers={"Cache-Control": "max-age=60"}, body=b"c", delay_s=0.2)
        answers = await asyncio.gather(*(get(cs, sc.port, "/cold") for _ in range(100)))
        assert o.hits["/cold"] == 1 and {b for _, b, _ in answers} == {b"c"}
        # not storable: the waiters go to the origin themselves (never share a private one)
        o.set("/mine", headers={"Cache-Control": "private, max-age=60"}, delay_s=0.1)
        await asyncio.gather(*(get(cs, sc.port, "/mine") for _ in range(5)))
        assert o.hits["/mine"] == 5


@pytest.mark.asyncio
async def test_requests_with_credentials_are_cached_only_when_public() -> None:
    async with edge_sidecar(cache={"enabled": True},
                            rate_limit={"client_header": "X-API-Key"}) as (sc, o), \
            aiohttp.ClientSession() as cs:
        o.set("/acct", headers={"Cache-Control": "max-age=60"}, body=b"alice's")
        o.set("/pub", headers={"Cache-Control": "public, max-age=60"}, body=b"same for all")
        for cred in ({"Authorization": "Bearer a"}, {"Cookie": "sid=a"}, {"X-API-Key": "k1"}):
            for _ in range(2):
                async with cs.get(f"http://127.0.0.1:{sc.port}/acct", headers=cred) as r:
                    assert r.headers["X-Cache"] == "MISS"
        assert o.hits["/acct"] == 6
        for _ in range(3):
            async with cs.get(f"http://127.0.0.1:{sc.port}/pub",
                              headers={"Authorization": "Bearer b"}) as r:
                await r.read()
        assert o.hits["/pub"] == 1
        # stored for an anonymous request, not public: never the answer to a credentialed
        # one (RFC 9111 §3.5), which goes to the origin; the anonymous still hit
        o.set("/page", headers={"Cache-Control": "max-age=60"}, body=b"anonymous view")
        assert (await get(cs, sc.port, "/page"))[2]["X-Cache"] == "MISS"
        assert (await get(cs, sc.port, "/page"))[2]["X-Cache"] == "HIT"
        for cred in ({"Authorization": "Bearer a"}, {"Cookie": "sid=a"}, {"X-API-Key": "k1"}):
            async with cs.get(f"http://127.0.0.1:{sc.port}/page", headers=cred) as r:
                assert r.headers["X-Cache"] == "MISS", cred
        assert o.hits["/page"] == 4
        assert (await get(cs, sc.port, "/page"))[2]["X-Cache"] == "HIT"


@pytest.mark.asyncio
async def test_memory_bound_holds_and_evicts_least_recently_used() -> None:
    bound = 64 * 1024
    async with edge_sidecar(cache={"enabled": True, "max_bytes": bound,
                                   "max_object_bytes": 8192}) as (sc, o), \
            aiohttp.ClientSession() as cs:
        o.set("/k", headers={"Cache-Control": "max-age=60"}, body=b"k" * 4096)
        for i in range(40):
            await get(cs, sc.port, f"/k?i={i}")
            assert edge_of(sc).cache.stores["orders"].bytes <= bound
        store = edge_of(sc).cache.stores["orders"]
        assert 10 <= len(store) < 40 and store.evictions == 40 - len(store)
        assert (await get(cs, sc.port, "/k?i=39"))[2]["X-Cache"] == "HIT"
        assert (await get(cs, sc.port, "/k?i=0"))[2]["X-Cache"] == "MISS"  # evicted
        o.set("/huge", headers={"Cache-Control": "max-age=60"}, body=b"h" * 20_000)
        for _ in range(2):
            status, body, _ = await get(cs, sc.port, "/huge")
            assert status == 200 and len(body) == 20_000
        assert o.hits["/huge"] == 2  # over max_object_bytes: relayed, never stored
    assert REGISTRY.get_sample_value("loadcast_sidecar_cache_evictions_total",
                                     {"sidecar": sc.id, "api": "orders"}) == store.evictions
    held = REGISTRY.get_sample_value("loadcast_sidecar_cache_bytes",
                                     {"sidecar": sc.id, "api": "orders"})
    assert held is not None and 0 < held <= bound


@pytest.mark.asyncio
async def test_cache_off_by_default_and_per_api() -> None:
    async with edge_sidecar() as (sc, o), aiohttp.ClientSession() as cs:
        o.set("/fresh", headers={"Cache-Control": "max-age=60"})
        for _ in range(2):
            assert "X-Cache" not in (await get(cs, sc.port, "/fresh"))[2]
        assert o.hits["/fresh"] == 2 and cast(ProxyPlane, sc.plane).proxy.edge is None
    async with edge_sidecar(cache={"enabled": True, "apis": ["other"]}) as (sc, o), \
            aiohttp.ClientSession() as cs:
        o.set("/fresh", headers={"Cache-Control": "max-age=60"})
        for _ in range(2):
            await get(cs, sc.port, "/fresh")
        assert o.hits["/fresh"] == 2
