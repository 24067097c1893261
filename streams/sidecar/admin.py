"""The sidecar's admin server: ``/health``, ``/metrics``, ``GET /weights``, and the
mutations (``PUT /weights``, ``PUT /policy``, ``PUT /dynamic-routing``,
``POST /endpoints/{id}/eject|readmit``), which need ``Authorization: Bearer <token>``
with the token from ``sidecar.admin_token`` (401 without it; with no token configured
no mutation is allowed at all).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams.sidecar.config import POLICY_NAMES, SidecarSettings
from streams.sidecar.dataplane import DataPlane
from streams.sidecar.director import MirrorDirector
from streams.sidecar.router import Router
from streams.sidecar.scores import ScoreSubscriber
from streams.sidecar.weights import WeightChange, WeightTable

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Sidecar(Protocol):
    """What the admin server reads and changes of a sidecar
    (:class:`streams.sidecar.app.Sidecar`)."""

    @property
    def id(self) -> str: ...
    @property
    def settings(self) -> SidecarSettings: ...
    @property
    def router(self) -> Router: ...
    @property
    def table(self) -> WeightTable: ...
    @property
    def plane(self) -> DataPlane: ...
    @property
    def director(self) -> MirrorDirector | None: ...
    @property
    def port(self) -> int: ...
    @property
    def subscriber(self) -> ScoreSubscriber | None: ...

    def set_manual_scores(self, api: str, scores: dict[str, float],
                          valid_s: float) -> list[WeightChange]: ...

    def policies_changed(self) -> None: ...


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _guarded(token: str, handler: Handler) -> Handler:
    """``handler`` behind ``Authorization: Bearer <token>`` (no token: always 401)."""
    async def wrapper(request: web.Request) -> web.StreamResponse:
        if not token:
            return _error(401, "admin mutations are disabled: set sidecar.admin_token")
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return web.json_response(
                {"error": "missing or wrong bearer token"}, status=401,
                headers={"WWW-Authenticate": 'Bearer realm="loadcast-sidecar"'},
            )
        return await handler(request)

    return wrapper


async def body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (400 for anything else)."""
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text="body must be a JSON object") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return data


def manual_scores_problem(sc: Sidecar, api: Any, scores: Any, valid: Any) -> str | None:
    """What is wrong with a ``PUT /weights`` body, or None."""
    if api not in sc.router.routes:
        return f"api: unknown API {api!r}; known: {', '.join(sc.router.routes)}"
    eps = {e.id for e in sc.router.routes[api].endpoints}
    if not isinstance(scores, dict) or not scores:
        return "scores: must be an object {endpoint_id: score in [0, 1]}"
    for e, v in scores.items():
        if e not in eps:
            return f"scores.{e}: not an endpoint of {api}"
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            return f"scores.{e}: must be a number in [0, 1], got {v!r}"
    if isinstance(valid, bool) or not isinstance(valid, int | float) or not 0 < valid <= 86400:
        return "valid_for_s: must be a number of seconds in (0, 86400]"
    return None


def admin_app(sc: Sidecar) -> web.Application:
    """The admin application of sidecar ``sc``."""
    token = sc.settings.admin_token.get_secret_value()

    def guarded(handler: Handler) -> Handler:
        return _guarded(token, handler)

    async def health(request: web.Request) -> web.Response:
        h = health_view(sc)
        return web.json_response(h, status=200 if h["status"] == "ok" else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def get_weights(request: web.Request) -> web.Response:
        return web.json_response(weights_view(sc))

    async def put_weights(request: web.Request) -> web.Response:
        data = await body(request)
        api: Any = data.get("api")
        scores: Any = data.get("scores")
        valid: Any = data.get("valid_for_s", 60)
        problem = manual_scores_problem(sc, api, scores, valid)
        if problem is not None:
            return _error(400, problem)
        sc.set_manual_scores(api, {e: float(v) for e, v in scores.items()}, float(valid))
        return web.json_response(weights_view(sc)[api])

    async def put_policy(request: web.Request) -> web.Response:
        data = await body(request)
        name = data.get("policy")
        api = data.get("api")
        if name not in POLICY_NAMES:
            return _error(400, f"policy: must be one of {', '.join(POLICY_NAMES)}")
        if api is not None and api not in sc.router.routes:
            return _error(400, f"api: unknown API {api!r}")
        sc.router.set_policy(name, api)
        sc.policies_changed()
        return web.json_response({"policy": name, "api": api})

    async def put_dynamic(request: web.Request) -> web.Response:
        data = await body(request)
        enabled = data.get("enabled")
        if not isinstance(enabled, bool):
            return _error(400, "enabled: must be true or false")
        sc.settings.dynamic_routing = enabled
        sc.plane.set_dynamic_routing(enabled)
        sc.policies_changed()
        return web.json_response({"dynamic_routing": enabled})

    async def endpoint_action(request: web.Request) -> web.Response:
        ep = sc.router.endpoints.get(request.match_info["id"])
        if ep is None:
            return _error(404, f"no endpoint {request.match_info['id']!r}")
        action = request.match_info["action"]
        if action == "eject":
            sc.router.eject(ep, time.monotonic(), 3600.0)
        elif action == "readmit":
            sc.router.readmit(ep)
        else:
            return _error(404, f"unknown action {action!r}: eject or readmit")
        return web.json_response({"endpoint": ep.id, "action": action})

    app = web.Application(client_max_size=1 << 20)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/weights", get_weights)
    app.router.add_put("/weights", guarded(put_weights))
    app.router.add_put("/policy", guarded(put_policy))
    app.router.add_put("/dynamic-routing", guarded(put_dynamic))
    app.router.add_post("/endpoints/{id}/{action}", guarded(endpoint_action))
    return app


def health_view(sc: Sidecar) -> dict[str, Any]:
    """The sidecar's health: data plane, score reader, routes, mirrors."""
    t = time.monotonic()
    apis = {}
    for api, r in sc.router.routes.items():
        apis[api] = {
            "stale": r.stale,
            "policy": r.active_policy(sc.settings.dynamic_routing).name,
            "available": sum(1 for e in r.endpoints if e.available(t)),
            "endpoints": len(r.endpoints),
        }
    ok = sc.plane.alive()
    sub = sc.subscriber
    reader = sub is None or sub.alive()
    return {
        "status": "data plane down" if not ok else "ok" if reader else "score reader down",
        "sidecar_id": sc.id,
        "data_plane": sc.settings.data_plane,
        "port": sc.port,
        "dynamic_routing": sc.settings.dynamic_routing,
        "apis": apis,
        "scores_received": sub.received if sub else 0,
        "scores_skipped": sub.skipped if sub else 0,
        "score_reader_restarts": sub.crashes if sub else 0,
        "mirrors": sc.director.view() if sc.director is not None else {},
    }


def weights_view(sc: Sidecar) -> dict[str, Any]:
    """The weight table with each route's policy, offered rate, shedding and endpoints."""
    t = time.monotonic()
    view = sc.table.snapshot(int(time.time() * 1000))
    for api, r in sc.router.routes.items():
        view[api]["policy"] = r.active_policy(sc.settings.dynamic_routing).name
        view[api]["offered_rps"] = round(r.offered_rps(t, sc.router.rate_window_s), 3)
        view[api]["overload"] = round(sc.router.update_overload(r, t), 4)
        view[api]["shed_share"] = round(r.shed_share, 4)
        view[api]["shed"] = r.shed_total
        view[api]["endpoints"] = {
            e.id: {"url": e.url, "weight": e.weight, "in_flight": e.in_flight,
                   "ejected": not e.available(t), "requests": e.requests,
                   "failures": e.failures, "peak_ewma_ms": round(e.rtt_ms, 3)}
            for e in r.endpoints
        }
    return view
