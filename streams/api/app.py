"""The aiohttp application of ``loadcast api``: answers from a :class:`ForecastState`.

Route modules add their routes with ``add_routes(app)`` and find the state and settings
under :data:`STATE` and :data:`SETTINGS`. Every answer is counted and timed by route
(:mod:`streams.api.metrics`); an error is JSON ``{"error": ..., "field": ...}``.

>>> app = create_app(ForecastState(), ApiSettings())
>>> sorted(r.resource.canonical for r in app.router.routes() if r.method == "GET")
['/health', '/metrics']
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams.api import metrics as m
from streams.api.config import ApiSettings
from streams.api.state import ForecastState

STATE = web.AppKey("state", ForecastState)
SETTINGS = web.AppKey("settings", ApiSettings)
FeedAlive = Callable[[], bool]
FEED_ALIVE: web.AppKey[FeedAlive] = web.AppKey("feed_alive")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str, field: str | None = None) -> web.Response:
    """A JSON error answer naming the field at fault, when there is one."""
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status)


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    started = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        m.REQUESTS.labels(name, str(status)).inc()
        m.LATENCY.labels(name).observe(time.perf_counter() - started)


async def health(request: web.Request) -> web.Response:
    """200 while the Kafka feed runs; says how many endpoints and how fresh."""
    state = request.app[STATE]
    alive = request.app[FEED_ALIVE]()
    age = state.newest_age_s()
    body = {
        "status": "ok" if alive else "feed down",
        "endpoints": len(state.scores),
        "newest_score_age_s": None if age is None else round(age, 3),
        "models": {f: r["version"] for f, r in state.models.items()},
    }
    return web.json_response(body, status=200 if alive else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    m.ENDPOINTS.set(len(state.scores))
    age = state.newest_age_s()
    if age is not None:
        m.SCORE_AGE.set(age)
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(state: ForecastState, settings: ApiSettings, *,
               feed_alive: Callable[[], bool] = lambda: True) -> web.Application:
    """The application with ``/health`` and ``/metrics``; route modules add the rest."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[_observe])
    app[STATE] = state
    app[SETTINGS] = settings
    app[FEED_ALIVE] = feed_alive
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
