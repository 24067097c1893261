"""Forecast-gated cache warming: while the forecast says a spike is ahead, the most
requested stored keys that would expire within the lead time are refreshed, within the
origin budget; with the gate shut (or the spike already here) nothing extra is sent."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from streams.sidecar.edge import table_pressure
from streams.sidecar.testing import score_record
from tests.edge_helpers import Origin, edge_of, edge_sidecar

OLDISH = {"Cache-Control": "max-age=10", "Age": "6"}  # 4 s of freshness left, half used


async def prime(cs: aiohttp.ClientSession, port: int, o: Origin) -> None:
    o.set("/k", headers=OLDISH, body=b"v1")
    for i, n in enumerate((5, 4, 3, 2, 1)):  # /k?i=0 most requested
        for _ in range(n):
            async with cs.get(f"http://127.0.0.1:{port}/k?i={i}") as r:
                assert r.status == 200
    o.set("/k", headers={"Cache-Control": "max-age=10"}, body=b"v2")


async def settle(o: Origin, want: int) -> None:
    t0 = time.monotonic()
    while sum(o.hits.values()) < want and time.monotonic() - t0 < 3:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_gate_open_refreshes_top_k_within_budget_and_shut_gate_sends_nothing() -> None:
    warming = {"enabled": True, "top_k": 3, "lead_s": 30, "threshold": 0.8,
               "budget_per_min": 60}
    async with edge_sidecar(cache={"enabled": True}, warming=warming) as (sc, o), \
            aiohttp.ClientSession() as cs:
        await prime(cs, sc.port, o)
        edge = edge_of(sc)
        assert sum(o.hits.values()) == 5
        edge.pressure = lambda api: (0.2, 0.5)  # no spike in sight
        edge.refresh()
        edge.pressure = lambda api: (0.95, 0.95)  # the spike is here: too late to warm
        edge.refresh()
        await asyncio.sleep(0.1)
        assert sum(o.hits.values()) == 5
        edge.pressure = lambda api: (0.3, 0.9)  # the peak ahead crosses 0.8 of capacity
        edge.refresh()
        await settle(o, 8)
        assert {k: o.hits[k] for k in sorted(o.hits)} == {
            "/k?i=0": 2, "/k?i=1": 2, "/k?i=2": 2, "/k?i=3": 1, "/k?i=4": 1}
        edge.refresh()  # just refreshed: not again
        await asyncio.sleep(0.1)
        assert sum(o.hits.values()) == 8 and edge.warmed == 3
        async with cs.get(f"http://127.0.0.1:{sc.port}/k?i=0") as r:
            assert await r.read() == b"v2" and r.headers["X-Cache"] == "HIT"


@pytest.mark.asyncio
async def test_origin_budget_caps_warming() -> None:
    warming = {"enabled": True, "top_k": 5, "lead_s": 30, "budget_per_min": 2}
    async with edge_sidecar(cache={"enabled": True}, warming=warming) as (sc, o), \
            aiohttp.ClientSession() as cs:
        await prime(cs, sc.port, o)
        edge = edge_of(sc)
        edge.pressure = lambda api: (0.3, 0.9)
        edge.refresh()
        edge.refresh()
        await settle(o, 7)
        assert sum(o.hits.values()) == 7 and edge.warmed == 2  # 5 stored, budget 2/min


@pytest.mark.asyncio
async def test_gate_follows_the_sidecars_forecast_and_needs_a_known_capacity() -> None:
    async with edge_sidecar(cache={"enabled": True}, warming={"enabled": True}) as (sc, _):
        edge = edge_of(sc)
        rec = score_record("o1", 0.3, api="orders", predicted_utilization=0.9,
                           capacity_rps=100.0)
        sc.apply_batch([("LoadScore", rec)])
        _, peak = table_pressure(sc.table)("orders")
        assert peak == pytest.approx(0.9)
        # the upper band: a mean forecast well within capacity, its upper band not
        rec = {**rec, "predicted_utilization": 0.4, "current_rps": 30.0, "forecast": [
            {"horizon": 1, "mean": 35.0, "lower": 20.0, "upper": 50.0},
            {"horizon": 5, "mean": 40.0, "lower": 20.0, "upper": 95.0}]}
        sc.apply_batch([("LoadScore", rec)])
        nxt, peak = table_pressure(sc.table)("orders")
        assert nxt == pytest.approx(0.35) and peak == pytest.approx(0.95)
        edge.refresh()
        assert edge.warm_active["orders"]  # the spike is ahead by the upper band
        rec = {**rec, "capacity_source": "DEFAULT"}  # a guessed capacity: gate stays shut
        sc.apply_batch([("LoadScore", rec)])
        assert table_pressure(sc.table)("orders") == (0.0, 0.0)
