"""The control room's HTTP side without a browser: the page and its assets are served, a
bad query is a 422 naming the field, the live stream sends a view at once and coalesces
bursts, is limited in number (503) and ends when the client goes away."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from schemas.records import LoadScore
from streams.api import ui
from streams.api.app import FEED_ALIVE
from streams.api.config import ApiSettings
from streams.api.service import ApiService
from streams.sidecar.testing import score_record


def _score(endpoint: str, at_ms: int, current: float = 40.0) -> tuple[str, dict[str, Any]]:
    rec = score_record(endpoint, 0.5, at_ms=at_ms, capacity_rps=100.0)
    rec["current_rps"] = current
    rec["forecast"] = [{"horizon": h, "at": at_ms + 1000 * h, "mean": current + 10 * h,
                        "lower": current, "upper": current + 20 * h} for h in (1, 2, 3)]
    return "LoadScore", rec


async def _events(resp: aiohttp.ClientResponse, n: int, timeout: float) -> list[dict[str, Any]]:
    """The next ``n`` view events of an SSE answer (fails after ``timeout`` s)."""
    out: list[dict[str, Any]] = []
    event = ""
    async with asyncio.timeout(timeout):
        while len(out) < n:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "view":
                out.append(json.loads(line[6:]))
    return out


@pytest.mark.asyncio
async def test_page_assets_and_bad_query() -> None:
    svc = ApiService(ApiSettings(port=0), None)
    await svc.start()
    base = f"http://127.0.0.1:{svc.port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/ui") as r:
                assert r.status == 200 and "loadcast control room" in await r.text()
            for asset in ("controlroom.js", "controlroom.css", "vendor/uPlot.iife.min.js"):
                async with http.get(f"{base}/ui/static/{asset}") as r:
                    assert r.status == 200, asset
            async with http.get(f"{base}/ui/state.json?horizon=zero") as r:
                assert r.status == 422
                assert (await r.json())["field"] == "horizon"
            async with http.get(f"{base}/ui/events?endpoint={'x' * 300}") as r:
                assert r.status == 422
                assert (await r.json())["field"] == "endpoint"
            async with http.get(f"{base}/ui/state.json") as r:
                view = await r.json()
            assert view["overview"] == [] and view["banners"][0]["kind"] == "empty"
            # a score carrying a NaN still makes a view: JSON's null in its place
            svc.state.apply([_score("e1", int(time.time() * 1000), current=float("nan"))])
            async with http.get(f"{base}/ui/state.json?horizon=2") as r:
                assert r.status == 200
                view = await r.json()
        row = view["overview"][0]
        assert row["current_rps"] is None and row["forecast"]["horizon"] == 2
    finally:
        await svc.stop()


@pytest.mark.asyncio
async def test_stream_coalesces_is_limited_and_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ui, "MAX_STREAMS", 2)
    svc = ApiService(ApiSettings(port=0), None)
    await svc.start()
    url = f"http://127.0.0.1:{svc.port}/ui/events"
    live = svc.app[ui.LIVE]
    now = int(time.time() * 1000)
    try:
        async with aiohttp.ClientSession() as http:
            first = await http.get(url)
            [view] = await _events(first, 1, 5)
            assert view["overview"] == []  # the snapshot comes at once, even when empty
            second = await http.get(url + "?endpoint=e1")
            async with http.get(url) as third:
                assert third.status == 503 and "limit 2" in (await third.json())["error"]
            # a burst of 60 changes in ~0.6 s: coalesced into a few views, the last one
            # holding the last score
            started = time.monotonic()
            for i in range(60):
                svc.state.apply([_score("e1", now + i, current=float(i))])
                await asyncio.sleep(0.01)
            views = await _events(first, 1, 5)
            while views[-1]["overview"][0]["current_rps"] != 59.0:
                views += await _events(first, 1, 5)
            elapsed = time.monotonic() - started
            assert len(views) <= elapsed / ui.MIN_INTERVAL_S + 2, (len(views), elapsed)
            [focused] = await _events(second, 1, 5)
            assert focused["overview"] == []  # its snapshot, sent before the burst
            while not focused["overview"] or focused["overview"][0]["current_rps"] != 59.0:
                [focused] = await _events(second, 1, 5)
            actual = [v for v in focused["charts"]["e1"]["actual"] if v is not None]
            assert actual[-1] == 59.0 and len(actual) == 60
            first.close()
            second.close()
            deadline = time.monotonic() + 5
            while live.open and time.monotonic() < deadline:
                svc.state.apply([_score("e1", now + 1000 + int(time.monotonic() * 1000))])
                await asyncio.sleep(0.1)
            assert live.open == 0 and live.served == 2
    finally:
        await svc.stop()


def test_overview_sorts_by_time_to_exhaustion() -> None:
    from processors.controlroom import overview

    now = 1_000_000
    a = LoadScore.from_record(_score("a", now, current=50.0)[1])   # mean 80 at h=3: none
    b = LoadScore.from_record(_score("b", now, current=75.0)[1])   # mean 105 at h=3: 3 s
    c = LoadScore.from_record(_score("c", now, current=120.0)[1])  # over capacity now
    rows = overview([a, b, c], {}, now)
    assert [r["endpoint_id"] for r in rows] == ["c", "b", "a"]
    assert [r["exhaustion_s"] for r in rows] == [0.0, 3.0, None]
    assert rows[2]["band_exhaustion_s"] == 3.0  # the band's upper bound 110 > 100 at h=3


@pytest.mark.asyncio
async def test_quiet_stream_beats_and_says_when_the_feed_is_down(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ui, "HEARTBEAT_S", 0.3)
    svc = ApiService(ApiSettings(port=0), None)
    alive = [True]
    svc.app[FEED_ALIVE] = lambda: alive[0]
    await svc.start()
    try:
        async with aiohttp.ClientSession() as http:
            resp = await http.get(f"http://127.0.0.1:{svc.port}/ui/events")
            await _events(resp, 1, 5)
            async with asyncio.timeout(5):
                while (await resp.content.readline()).strip() != b"event: beat":
                    pass
            alive[0] = False  # no state change: the stream notices within CHECK_S
            [view] = await _events(resp, 1, 5)
            resp.close()
        assert view["feed_alive"] is False
        assert [b["kind"] for b in view["banners"]] == ["feed", "empty"]
        assert "Kafka feed down" in view["banners"][0]["text"]
    finally:
        await svc.stop()


def test_mirror_lead_time_is_crossing_minus_ready() -> None:
    from processors.controlroom import mirror_rows

    def score(endpoint: str, at: int, current: float) -> LoadScore:
        rec = _score(endpoint, at, current)[1]
        return LoadScore.from_record({**rec, "api": "orders", "region": "eu"})

    history = {"a": [score("a", 1000, 60.0), score("a", 9000, 120.0)],
               "b": [score("b", 2000, 90.0)]}
    mirror = {"region": "eu", "api": "orders", "state": "READY", "at": 5000,
              "command_id": "c1", "since": {"ACCEPTED": 1500, "STARTING": 2000,
                                            "READY": 5000}}
    [row] = mirror_rows([mirror], history)
    # commanded at 1.5 s, ready at 5 s; 120 + 90 > 200 first at 9 s: ready 4 s early
    assert (row["commanded_at"], row["ready_at"], row["crossed_at"]) == (1500, 5000, 9000)
    assert row["lead_s"] == 4.0 and row["activity"] == "ready"
    [late] = mirror_rows([{**mirror, "since": {"ACCEPTED": 1500, "READY": 9500}}], history)
    assert late["lead_s"] == -0.5


def test_costly_views_are_spaced(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = ApiService(ApiSettings(port=0), None)
    query = ui.ViewQuery()
    key1, body1 = ui._view_bytes(svc.app, query)
    live = svc.app[ui.LIVE]
    live.build_s = 1.0  # as if that build had taken a second
    svc.state.apply([_score("e1", int(time.time() * 1000))])
    assert ui._view_bytes(svc.app, query) == (key1, body1)  # within 10 s: the old view
    live.built_at -= ui.BUILD_SPACING
    key2, body2 = ui._view_bytes(svc.app, query)
    assert key2[0] == svc.state.version and b'"e1"' in body2
