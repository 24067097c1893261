"""The live control room of ``loadcast api``: ``GET /ui`` (one page, static assets, no
build step), ``GET /ui/state.json`` (what the page shows, once) and ``GET /ui/events``
(the same as server-sent events, live).

A stream sends a complete view at once, then a new one whenever the state changes or an
endpoint's score goes stale or the Kafka feed goes down or comes back (checked every
``CHECK_S``), at most one every ``MIN_INTERVAL_S`` (changes in between are coalesced into
the next view), and a ``beat`` event every ``HEARTBEAT_S`` so a dead client (and, in
the page, a dead server) is noticed. Each view is complete, so a browser that reconnects
(the API restarted) needs nothing else. At most ``MAX_STREAMS`` streams at once (503
above); a view is built once per state and shared by the streams that ask for the same
one, and building takes at most about ``1 / BUILD_SPACING`` of the time. The numbers
come from :mod:`processors.controlroom`.

>>> from streams.api.config import ApiSettings
>>> from streams.api.state import ForecastState
>>> from streams.api.app import create_app
>>> app = create_app(ForecastState(), ApiSettings())
>>> add_routes(app)
>>> sorted(r.resource.canonical for r in app.router.routes() if r.resource.canonical
...        .startswith("/ui") and r.method == "GET")
['/ui', '/ui/events', '/ui/state.json', '/ui/static']
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from processors import controlroom as cr
from streams.api.app import FEED_ALIVE, STATE, error
from streams.api.operations import Operation, add_operations
from streams.api.state import ForecastState

STATIC = Path(__file__).parent / "static"
MAX_STREAMS = 16  # live pages at once; each costs a view per change
MIN_INTERVAL_S = 0.25  # at most four views a second per stream
CHECK_S = 1.0  # how often a quiet stream checks for stale scores and the feed
HEARTBEAT_S = 10.0
OVERVIEW_ROWS = 200  # endpoints listed (the soonest to run out)
CHARTS = 4  # endpoints charted: the soonest to run out, plus the one asked for
CHART_POINTS = 240
# Views are built on the event loop that also answers the API: after a build of B
# seconds the next waits BUILD_SPACING * B (at 100,000 endpoints a build is about a
# second), so views take at most about a tenth of the loop.
BUILD_SPACING = 10.0
MAX_HORIZON = 10_000
MAX_ENDPOINT_ID = 256


@dataclass(frozen=True)
class ViewQuery:
    """What a page asks for: the forecast horizon (steps; None = the farthest) and the
    endpoint it wants charted besides the most urgent ones."""

    horizon: int | None = None
    endpoint: str | None = None


@dataclass
class LiveStreams:
    """Streams open now, the views built (by key, a few kept), and whether the server is
    shutting down (open streams end)."""

    open: int = 0
    served: int = 0
    views: dict[tuple[Any, ...], bytes] = field(default_factory=dict)
    latest: dict[ViewQuery, tuple[tuple[Any, ...], bytes]] = field(default_factory=dict)
    flags: tuple[Any, tuple[Any, ...]] = (None, ())  # (when, _flags) of the last check
    built_at: float = 0.0  # monotonic time the last view was built
    build_s: float = 0.0  # how long that took
    closing: asyncio.Event = field(default_factory=asyncio.Event)


LIVE: web.AppKey[LiveStreams] = web.AppKey("ui_live", LiveStreams)


def parse_query(request: web.Request) -> ViewQuery:
    """``?horizon=`` and ``?endpoint=``; a bad one is a 422 naming it."""
    q = request.query
    horizon = None
    if q.get("horizon"):
        try:
            horizon = int(q["horizon"])
        except ValueError:
            raise _bad("horizon must be an integer", "horizon") from None
        if not 1 <= horizon <= MAX_HORIZON:
            raise _bad(f"horizon must be within 1..{MAX_HORIZON}", "horizon")
    endpoint = q.get("endpoint") or None
    if endpoint is not None and len(endpoint) > MAX_ENDPOINT_ID:
        raise _bad(f"endpoint is longer than {MAX_ENDPOINT_ID} characters", "endpoint")
    return ViewQuery(horizon, endpoint)


def _bad(message: str, field_name: str) -> web.HTTPUnprocessableEntity:
    return web.HTTPUnprocessableEntity(
        text=json.dumps({"error": message, "field": field_name}),
        content_type="application/json")


def _flags(live: LiveStreams, state: ForecastState, feed_alive: bool,
           now_ms: int) -> tuple[Any, ...]:
    """What changes the page without a state change: staleness and the feed. Worked out
    once per state and ``CHECK_S`` for all the streams (a pass over every endpoint)."""
    at = (state.version, feed_alive, int(now_ms / (CHECK_S * 1000)))
    if live.flags[0] != at:
        live.flags = (at, (feed_alive, tuple(cr.stale_endpoints(state.scores.values(),
                                                                 now_ms))))
    return live.flags[1]


def banners(state: ForecastState, feed_alive: bool, stale: tuple[str, ...],
            now_ms: int) -> list[dict[str, Any]]:
    """What the operator must not miss, each saying which component or endpoints."""
    out: list[dict[str, Any]] = []
    if not feed_alive:
        out.append({"kind": "feed", "text": "Kafka feed down: the API is not receiving "
                    "scores; what is shown is the last known state"})
    if not state.scores:
        out.append({"kind": "empty", "text": "No scores received yet (is a worker "
                    "running and producing load-scores?)"})
    elif stale:
        newest = max(s.computed_at for s in state.scores.values())
        names = ", ".join(stale[:10]) + (f" and {len(stale) - 10} more" if len(stale) > 10
                                         else "")
        out.append({"kind": "stale", "endpoints": list(stale[:50]), "newest_at": newest,
                    "text": f"Stale scores: {len(stale)} of {len(state.scores)} endpoint(s) "
                            f"past valid_until ({names}); is the worker running?"})
    return out


def build_view(state: ForecastState, feed_alive: bool, query: ViewQuery,
               now_ms: int, stale: tuple[str, ...]) -> dict[str, Any]:
    """The whole page's data as a JSON-ready dict."""
    rows = cr.overview(state.scores.values(), state.anomalies, now_ms,
                       horizon=query.horizon, limit=OVERVIEW_ROWS)
    charted = [r["endpoint_id"] for r in rows[:CHARTS]]
    if query.endpoint and query.endpoint not in charted and query.endpoint in state.history:
        charted.insert(0, query.endpoint)
    charts = {eid: cr.chart(state.history[eid], query.horizon,
                            anomaly=state.anomalies.get(eid), points=CHART_POINTS)
              for eid in charted if eid in state.history}
    mirrors = cr.mirror_rows((asdict(m) for m in state.mirrors.values()), state.history)
    return {
        "now": now_ms, "version": state.version, "feed_alive": feed_alive,
        "updated_at": None if state.updated_at is None else int(state.updated_at * 1000),
        "banners": banners(state, feed_alive, stale, now_ms),
        "endpoints_total": len(state.scores), "overview": rows,
        "charted": charted, "charts": charts, "mirrors": mirrors,
        "models": {f: r.get("version") for f, r in state.models.items()},
        "notes": ["Routing weights and per-lane p99/errors are on routing-decisions, "
                  "which the API does not read; p99 and errors here are the endpoints' "
                  "own from their scores."],
    }


def _view_bytes(app: web.Application, query: ViewQuery) -> tuple[tuple[Any, ...], bytes]:
    """The current view (JSON bytes) and its key; built once per key for all streams."""
    state, live = app[STATE], app[LIVE]
    now_ms = int(time.time() * 1000)
    alive = app[FEED_ALIVE]()
    flags = _flags(live, state, alive, now_ms)
    key = (state.version, flags, query)
    body = live.views.get(key)
    if body is not None:
        return key, body
    previous = live.latest.get(query)
    if previous is not None and \
            time.monotonic() - live.built_at < BUILD_SPACING * live.build_s:
        return previous  # too soon after a costly build: the new state waits its turn
    started = time.perf_counter()
    view = build_view(state, alive, query, now_ms, flags[1])
    try:
        body = json.dumps(view, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # a NaN or infinity in a record: JSON has no such number
        body = json.dumps(_finite(view), separators=(",", ":")).encode()
    live.build_s, live.built_at = time.perf_counter() - started, time.monotonic()
    if len(live.views) >= 2 * MAX_STREAMS:
        live.views.clear()  # a new state: the old views are of no use
        live.latest.clear()
    live.views[key] = body
    live.latest[query] = (key, body)
    return key, body


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def page(request: web.Request) -> web.FileResponse:
    """The control room page."""
    return web.FileResponse(STATIC / "index.html",
                            headers={"Cache-Control": "no-cache"})


async def state_json(request: web.Request) -> web.Response:
    """What the page shows now, as one JSON document."""
    _, body = _view_bytes(request.app, parse_query(request))
    return web.Response(body=body, content_type="application/json")


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``view`` events (complete views) and heartbeats."""
    live = request.app[LIVE]
    query = parse_query(request)
    if live.open >= MAX_STREAMS:
        return error(503, f"too many live streams open (limit {MAX_STREAMS}); "
                          "close a control room tab or retry later")
    live.open += 1
    live.served += 1
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    try:
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n\n")  # the browser reconnects after 2 s
        await _stream(request.app, resp, query, live)
    except ConnectionResetError:
        pass  # the page went away
    finally:
        live.open -= 1
    return resp


async def _stream(app: web.Application, resp: web.StreamResponse, query: ViewQuery,
                  live: LiveStreams) -> None:
    state = app[STATE]
    sent: tuple[Any, ...] | None = None
    beat = time.monotonic()
    while not live.closing.is_set():
        key, body = _view_bytes(app, query)
        if key != sent:
            await resp.write(b"event: view\ndata: " + body + b"\n\n")
            sent, beat = key, time.monotonic()
        elif time.monotonic() - beat >= HEARTBEAT_S:
            await resp.write(b"event: beat\ndata: %d\n\n" % int(time.time() * 1000))
            beat = time.monotonic()
        await asyncio.sleep(MIN_INTERVAL_S)  # coalesce: changes meanwhile go in one view
        await state.changed(key[0], CHECK_S)


async def _closing(app: web.Application) -> None:
    app[LIVE].closing.set()


def add_routes(app: web.Application) -> None:
    """Add the control room's routes and static files to ``app``."""
    app[LIVE] = LiveStreams()
    app.on_shutdown.append(_closing)
    add_operations(app, [
        Operation("GET", "/ui", page, "The live control room (HTML page)", tag="ui"),
        Operation("GET", "/ui/state.json", state_json,
                  "What the control room shows now (overview, charts, mirrors, banners)",
                  tag="ui", extra_responses={422: "a bad horizon or endpoint"}),
        Operation("GET", "/ui/events", events,
                  "The control room's view as server-sent events, live", tag="ui",
                  extra_responses={422: "a bad horizon or endpoint",
                                   503: "too many live streams"}),
    ])
    app.router.add_static("/ui/static", STATIC, append_version=False)
