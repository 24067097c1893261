"""What the built-in proxy serves itself: response cache, compression, adaptive per-client
rate limits and forecast-gated cache warming, each off unless configured
(:mod:`streams.sidecar.edge_config`).

The proxy asks, per request: :meth:`Edge.limit` (429 or go on), :meth:`Edge.cacheable`
and :meth:`Edge.serve` (the cache path), and :meth:`Edge.coding` / :meth:`Edge.finish`
(compression of what goes back). :meth:`Edge.tick` runs every second: it reads the
forecast for each API (demand over a *known* capacity, from the sidecar's weight table:
``pressure(api) -> (next step, peak over the horizon)``), moves the rate limits with the
headroom, and opens the warming gate while a spike is ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from aiohttp import web

from streams.sidecar import metrics as m
from streams.sidecar.cache_policy import request_bypass
from streams.sidecar.cache_store import StoredResponse
from streams.sidecar.compression import add_vary, compress, negotiate, worth_compressing
from streams.sidecar.config import SidecarSettings
from streams.sidecar.edge_cache import X_CACHE, EdgeCache, Origin
from streams.sidecar.fastpath import response_head
from streams.sidecar.ratelimit import (
    RateLimiter,
    RateRule,
    base_rate,
    client_digest,
    headroom,
    rate_headers,
)
from streams.sidecar.router import Route
from streams.sidecar.warming import Budget, due, gate_open
from streams.sidecar.weights import WeightTable

log = logging.getLogger(__name__)

# (api) -> (forecast demand / known capacity: next step, peak over the horizon); 0 unknown
Pressure = Callable[[str], tuple[float, float]]
Capacity = Callable[[str], float | None]  # the API's CONFIGURED/LEARNED capacity, or None


def table_pressure(table: WeightTable) -> Pressure:
    """Forecast demand over the API's known capacity from the sidecar's weight table: (next
    step, peak of the forecast's upper band over the horizon); 0 without fresh scores or a
    configured/learned capacity."""
    def pressure(api: str) -> tuple[float, float]:
        t = int(time.time() * 1000)
        return table.overload(api, t, "next"), table.overload(api, t, "upper")
    return pressure


def table_capacity(table: WeightTable) -> Capacity:
    """The API's CONFIGURED or confidently LEARNED capacity (rps), else None."""
    return lambda api: table.total_capacity(api, int(time.time() * 1000))


def _no_pressure(api: str) -> tuple[float, float]:
    return 0.0, 0.0


def _no_capacity(api: str) -> float | None:
    return None


class Edge:
    """Cache, compression, limits and warming of one proxy."""

    def __init__(self, settings: SidecarSettings, sidecar_id: str, routes: Mapping[str, Route],
                 origin: Origin, *, pressure: Pressure | None = None,
                 capacity: Capacity | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.sidecar_id = sidecar_id
        self.routes = routes
        self.pressure = pressure or _no_pressure
        self.capacity = capacity or _no_capacity
        self.clock = clock
        comp = settings.compression
        self.compressing = comp.enabled or settings.compress_responses
        self.codings = tuple(comp.algorithms) if comp.enabled else ("gzip",)
        rl = settings.rate_limit
        self.limiting = rl.enabled
        self.client_header = rl.client_header
        self.rule = RateRule(burst_s=rl.burst_s, headroom_threshold=rl.headroom_threshold,
                             min_factor=rl.min_factor, heavy_share=rl.heavy_share,
                             anomaly_factor=rl.anomaly_factor, max_clients=rl.max_clients)
        self.limiters = {api: RateLimiter(self.rule) for api in routes}
        self._base: dict[str, float | None] = {api: None for api in routes}
        self.cache = EdgeCache(settings.cache, sidecar_id, origin,
                               credential_headers=(rl.client_header,), finish=self.finish,
                               head=self._head, clock=clock)
        self.warming = settings.warming.enabled and settings.cache.enabled
        self.cache.track_popular = self.warming
        self.budgets = {api: Budget(settings.warming.budget_per_min) for api in routes}
        self.warm_active: dict[str, bool] = {}
        self.warmed = 0
        self._task: asyncio.Task[None] | None = None
        self.fast_apis: set[str] = set()  # whose fresh hits may take the fast path
        self.refresh()

    @property
    def active(self) -> bool:
        """Anything on at all (else the proxy skips the edge entirely)."""
        return self.compressing or self.limiting or self.settings.cache.enabled

    # ------------------------------------------------------------------ rate limits

    def limit(self, route: Route, request: web.BaseRequest) -> web.Response | None:
        """None to go on, or the 429 for a client over its rate."""
        if not self.limiting:
            return None
        base = self._base.get(route.api)
        if base is None:  # no configured rate and no known capacity: never limit
            return None
        key = (request.headers.get(self.client_header) if self.client_header else None) \
            or request.remote or "-"
        d = self.limiters[route.api].take(client_digest(key), self.clock(), base)
        if d.allowed:
            return None
        m.RATE_LIMITED.labels(self.sidecar_id, route.api).inc()
        return web.json_response(
            {"error": "rate_limited",
             "message": f"client over its rate of {d.limit:.3g} requests/s for API "
                        f"{route.api}" + (" (tightened: forecast headroom is low)"
                                          if d.factor < 1 else "")},
            status=429, headers=rate_headers(d))

    def refresh(self) -> None:
        """Re-read the forecast: per-client base rates and headroom, the warming gates;
        which APIs' fresh hits may take the fast path (cached, and not rate limited: a
        limited API's requests take the bucket on the ordinary path)."""
        rl = self.settings.rate_limit
        for api in self.routes:
            nxt, peak = self.pressure(api)
            if self.limiting:
                self._base[api] = base_rate(rl.base_rps, rl.per_client_share,
                                            self.capacity(api))
                room = headroom(max(nxt, peak))
                self.limiters[api].refresh(room)
                m.RATE_FACTOR.labels(self.sidecar_id, api).set(room)
            if self.warming:
                self._warm(api, nxt, peak)
        self.fast_apis = {api for api in self.routes if self.cache.caches(api)
                           and not (self.limiting and self._base.get(api) is not None)}

    # ------------------------------------------------------------------ cache

    def cacheable(self, route: Route, request: web.BaseRequest) -> bool:
        """Does this request take the cache path (unless its key passes: see
        :meth:`EdgeCache.passes`)?"""
        if not self.cache.caches(route.api):
            return False
        why = request_bypass(request.method, request.headers)
        if why is not None:
            if request.method == "GET":
                self.cache.count(route.api, "bypass")
            return False
        return True

    async def serve(self, request: web.BaseRequest, route: Route,
                    target: str) -> web.StreamResponse:
        return await self.cache.serve(request, route, target)

    def fresh_hit(self, route: Route, h: Mapping[str, str], target: str) -> bytes | None:
        """A fresh hit's whole answer for the fast path (:mod:`streams.sidecar.fastpath`),
        or None: the ordinary path (:meth:`limit`, :meth:`cacheable`, :meth:`serve`)."""
        if route.api not in self.fast_apis:
            return None
        return self.cache.fresh_hit(route.api, target, h)

    def _head(self, e: StoredResponse) -> bytes:
        """A stored response's prebuilt head for fresh hits, b"" when its answer depends
        on more than the stored bytes (a 200 only; none when it would be compressed)."""
        if e.status != 200:
            return b""
        if self.compressing:
            c = self.settings.compression
            if worth_compressing("GET", e.status, e.header("Content-Type"),
                                 e.header("Content-Encoding"), len(e.body),
                                 min_bytes=c.min_bytes, types=c.types):
                return b""
        x_cache = "HIT" if self.settings.cache.x_cache_header else None
        return response_head(e.status, e.headers, len(e.body), x_cache) or b""

    def _warm(self, api: str, nxt: float, peak: float) -> None:
        """While a spike is ahead (the peak forecast crosses the threshold, the next step
        not yet), refresh the most requested stored keys that would expire within the lead
        time, within the origin budget. During the spike itself nothing extra is sent."""
        w = self.settings.warming
        route = self.routes[api]
        ahead = gate_open(peak, w.threshold) and not gate_open(nxt, w.threshold)
        if ahead != self.warm_active.get(api, False):
            self.warm_active[api] = ahead
            m.WARM_ACTIVE.labels(self.sidecar_id, api).set(1 if ahead else 0)
            log.info("cache warming of %s %s (forecast peak %.2f of capacity)", api,
                     "on" if ahead else "off", peak)
        if not ahead or api not in self.cache.stores:
            return
        store = self.cache.stores[api]
        now = self.clock()
        budget = self.budgets[api]
        for key in self.cache.popular[api].top(w.top_k):
            for e in store.variants(key):
                age = e.fresh.initial_age_s + now - e.stored_at
                if due(e.fresh.ttl(now - e.stored_at), w.lead_s, age, e.fresh.lifetime_s) \
                        and budget.take(now) \
                        and self.cache.refresh_behind(route, key, e, "warm"):
                    self.warmed += 1

    # ------------------------------------------------------------------ compression

    def coding(self, request: web.BaseRequest, status: int, headers: Mapping[str, str],
               length: int | None) -> str | None:
        """The coding to compress this response with for this client, or None. Adds
        ``Vary: Accept-Encoding`` to ``headers`` (mutable) when the answer depends on it."""
        if not self.compressing:
            return None
        c = self.settings.compression
        if length is not None and length < c.min_bytes:
            return None  # the common small answer: no header looked at
        if not worth_compressing(request.method, status, headers.get("Content-Type"),
                                 headers.get("Content-Encoding"), length,
                                 min_bytes=c.min_bytes, types=c.types):
            return None
        headers["Vary"] = add_vary(headers.get("Vary"))  # type: ignore[index]
        return negotiate(request.headers.get("Accept-Encoding"), self.codings)

    def finish(self, request: web.BaseRequest, resp: web.Response,
               stored: StoredResponse | None = None) -> web.Response:
        """Compress a whole (not yet sent) response for this client; compressed copies of
        stored responses are kept with them (charged to the cache's memory)."""
        body = resp.body
        if not self.compressing or not isinstance(body, bytes):
            return resp
        coding = self.coding(request, resp.status, resp.headers, len(body))
        if coding is None:
            return resp
        data = stored.encoded.get(coding) if stored is not None else None
        if data is None:
            data = compress(body, coding)
            if stored is not None:
                stored.encoded[coding] = data
                self.cache.charge(stored)
        m.COMPRESSED.labels(self.sidecar_id, coding).inc()
        resp.body = data
        resp.headers["Content-Encoding"] = coding
        etag = resp.headers.get("ETag")
        if etag and not etag.startswith("W/"):
            resp.headers["ETag"] = "W/" + etag  # the encoded bytes differ
        return resp

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the once-a-second loop: the forecast (limits and warming), the fast
        path's hit counts into the metrics."""
        if (self.limiting or self.warming or self.settings.cache.enabled) \
                and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        period = min(1.0, self.settings.warming.interval_s)
        while True:
            await asyncio.sleep(period)
            try:
                self.cache.flush_counts()
                self.refresh()
            except Exception:  # the forecast loop must never stop the proxy
                log.exception("edge forecast tick failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.cache.close()


__all__ = ["X_CACHE", "Capacity", "Edge", "Pressure"]
