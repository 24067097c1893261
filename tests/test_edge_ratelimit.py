"""Adaptive per-client rate limits: a heavy client gets 429 with Retry-After and
RateLimit-* while light clients pass; limits tighten for the heaviest clients when the
forecast (LoadScore records, as the scorer publishes them) says capacity will run out, and
relax after; nothing is limited on a guessed number."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client import REGISTRY

from streams.sidecar.ratelimit import RateLimiter, RateRule, client_digest
from streams.sidecar.testing import score_record
from tests.edge_helpers import edge_of, edge_sidecar

LIMITS = {"enabled": True, "base_rps": 10.0, "burst_s": 1.0, "client_header": "X-API-Key"}


async def burst(cs: aiohttp.ClientSession, port: int, key: str, n: int) -> list[int]:
    out = []
    for _ in range(n):
        async with cs.get(f"http://127.0.0.1:{port}/x", headers={"X-API-Key": key}) as r:
            out.append(r.status)
            if r.status == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert r.headers["RateLimit-Remaining"] == "0"
                assert int(r.headers["RateLimit-Limit"]) >= 1
                assert "RateLimit-Reset" in r.headers
                assert (await r.json())["error"] == "rate_limited"
    return out


@pytest.mark.asyncio
async def test_heavy_client_gets_429_light_clients_unaffected() -> None:
    async with edge_sidecar(rate_limit=LIMITS) as (sc, _), aiohttp.ClientSession() as cs:
        heavy = await burst(cs, sc.port, "heavy-key", 30)
        assert heavy[:10] == [200] * 10 and heavy.count(429) >= 15
        for light in ("l1", "l2", "l3"):
            assert await burst(cs, sc.port, light, 3) == [200, 200, 200]
        limiter = edge_of(sc).limiters["orders"]
        assert client_digest("heavy-key") in limiter.clients
        assert all(b"heavy" not in k for k in limiter.clients)  # keys kept hashed only
    assert REGISTRY.get_sample_value("loadcast_sidecar_rate_limited_total",
                                     {"sidecar": sc.id, "api": "orders"}) == heavy.count(429)


@pytest.mark.asyncio
async def test_no_limit_without_a_configured_rate_or_known_capacity() -> None:
    rl = {"enabled": True, "per_client_share": 0.01}  # a share of... no capacity known
    async with edge_sidecar(rate_limit=rl) as (sc, _), aiohttp.ClientSession() as cs:
        assert await burst(cs, sc.port, "k", 40) == [200] * 40


@pytest.mark.asyncio
async def test_limits_tighten_when_forecast_runs_out_and_relax_after() -> None:
    async with edge_sidecar(rate_limit=LIMITS) as (sc, _), aiohttp.ClientSession() as cs:
        edge = edge_of(sc)
        assert await burst(cs, sc.port, "heavy", 8) == [200] * 8  # within the burst of 10
        for light in ("l1", "l2", "l3", "l4", "l5"):
            await burst(cs, sc.port, light, 1)
        # the forecast: 95 % of a CONFIGURED capacity of 100 rps (headroom 0.05 < 0.2)
        sc.apply_batch([("LoadScore", score_record("o1", 0.2, api="orders",
                                                   predicted_utilization=0.95,
                                                   capacity_rps=100.0))])
        edge.refresh()
        assert edge.limiters["orders"].headroom == pytest.approx(0.05)
        tight = await burst(cs, sc.port, "heavy", 6)
        assert tight.count(429) >= 3  # 2.5 rps now, not 10
        assert await burst(cs, sc.port, "l1", 2) == [200, 200]  # light: untouched
        async with cs.get(f"http://127.0.0.1:{sc.port}/x", headers={"X-API-Key": "heavy"}) as r:
            assert r.status == 429 and int(r.headers["RateLimit-Limit"]) <= 3
            assert "tightened" in (await r.json())["message"]
        # the forecast relaxes: heavy is back to 10 rps (2 tokens after 0.25 s, not 0.6)
        sc.apply_batch([("LoadScore", score_record("o1", 0.9, api="orders",
                                                   predicted_utilization=0.3,
                                                   capacity_rps=100.0))])
        edge.refresh()
        await asyncio.sleep(0.25)
        assert await burst(cs, sc.port, "heavy", 2) == [200, 200]


def test_anomalous_client_is_limited_first() -> None:
    lim = RateLimiter(RateRule(short_tau_s=2.0, long_tau_s=60.0))
    t = 0.0
    for _ in range(120):  # a steady client at 1 rps for two minutes, and the others
        t += 1.0
        for k in (b"steady", b"other1", b"other2", b"other3"):
            lim.take(k, t, base=100.0)
    for _ in range(60):  # steady suddenly sends 20 rps
        t += 0.05
        lim.take(b"steady", t, base=100.0)
    lim.refresh(headroom=0.15)  # a bit short of room
    _heavy, anomalous = lim.classify(lim.clients[b"steady"], t)
    assert anomalous
    d = lim.take(b"steady", t + 0.05, base=100.0)
    assert d.factor == pytest.approx(0.25)  # min_factor, before the others
    assert lim.take(b"other1", t + 0.05, base=100.0).factor == 1.0
    lim.refresh(headroom=0.9)
    assert lim.take(b"steady", t + 0.1, base=100.0).factor == 1.0


def test_bucket_count_is_bounded() -> None:
    lim = RateLimiter(RateRule(max_clients=100))
    for i in range(1000):
        lim.take(client_digest(f"c{i}"), float(i), base=1.0)
    assert len(lim.clients) == 100
