"""The built-in proxy's response cache: serving, single-flight, stale-while-revalidate,
stale-if-error and revalidation, over the pure rules (:mod:`streams.sidecar.cache_policy`)
and store (:mod:`streams.sidecar.cache_store`).

Per request (a GET the policy does not bypass):

- a fresh stored variant answers at once (``X-Cache: HIT``); a client's matching
  ``If-None-Match`` gets a 304;
- a variant within ``stale-while-revalidate`` answers at once (``STALE``) and one
  background request revalidates it;
- anything else goes to the origin through **one** flight per key: concurrent requests for
  the same key wait for it and are then answered from the store (``HIT``); if what came
  back was not storable they go to the origin themselves (RFC 9111 4: collapsing only
  what may be shared). A stored variant with validators is revalidated
  (``If-None-Match`` / ``If-Modified-Since``; a 304 refreshes it: ``REVALIDATED``);
- when the origin fails (5xx, or no endpoint answered) and a stored variant is within
  ``stale-if-error``, that answers (``STALE``).

Forecast-gated warming (:meth:`EdgeCache.warm`) uses the same background refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from streams.sidecar import metrics as m
from streams.sidecar.cache_policy import (
    NOT_UPDATED_BY_304,
    client_not_modified,
    conditional_headers,
    freshness,
    has_credentials,
    must_revalidate_request,
    serves_credentials,
    why_not_storable,
)
from streams.sidecar.cache_store import CacheStore, StoredResponse
from streams.sidecar.edge_config import EdgeCacheSettings
from streams.sidecar.router import Route
from streams.sidecar.warming import KeyFrequency

log = logging.getLogger(__name__)

X_CACHE = "X-Cache"
_NOT_FORWARDED = frozenset({"if-none-match", "if-modified-since", "connection", "keep-alive",
                            "te", "trailer", "transfer-encoding", "upgrade", "content-length",
                            "proxy-connection", "proxy-authorization"})


@dataclass
class Fetched:
    """An origin response read whole (what the cache can store)."""

    status: int
    reason: str | None
    headers: CIMultiDict[str]  # hop-by-hop and Content-Length already removed
    body: bytes


OriginResult = Fetched | web.StreamResponse | None
# (route, target, request headers, the client's request or None for background) -> result
Origin = Callable[[Route, str, list[tuple[str, str]], web.BaseRequest | None],
                  Awaitable[OriginResult]]
Finish = Callable[[web.BaseRequest, web.Response, StoredResponse | None], web.Response]
Head = Callable[[StoredResponse], bytes]  # a fresh hit's prebuilt head, b"": not that way
# request headers that send a hit the ordinary way (revalidation asked, ranges, the
# client's own validators, credentials): the fast path answers only the plain case
PASS_S = 1.0  # how long a key whose answer was not storable skips the cache path
MAX_PASSING = 10_000
_NOT_FAST = ("cache-control", "pragma", "range", "if-none-match", "authorization", "cookie",
             "proxy-authorization")


def revalidated(e: StoredResponse, got: Fetched, now: float) -> None:
    """A 304 refreshes the stored response's metadata (RFC 9111 4.3.4)."""
    fresh = {k.lower() for k in got.headers if k.lower() not in NOT_UPDATED_BY_304}
    merged = [(k, v) for k, v in e.headers if k.lower() not in fresh]
    merged += [(k, v) for k, v in got.headers.items() if k.lower() in fresh]
    e.headers = tuple(merged)
    e.head = None
    e.fresh = freshness(dict(merged))
    e.stored_at = now


class Shortcuts:
    """The response cache's per-request shortcuts and counts: fresh hits whole for the
    fast path, keys passed straight to the origin, metric children kept (hot path)."""

    sidecar_id: str
    stores: dict[str, CacheStore]
    popular: dict[str, KeyFrequency]
    head: Head | None
    clock: Callable[[], float]
    track_popular: bool
    fast_hits: dict[str, int]
    passing: dict[tuple[str, str], tuple[float, str]]
    _not_fast: tuple[str, ...]
    _counters: dict[tuple[int, str, str], m.Counter]

    def count(self, api: str, result: str, metric: m.Counter = m.CACHE_LOOKUPS,
              n: int = 1) -> None:
        """Add ``n`` to ``metric`` (labels sidecar, api, ``result``); children kept."""
        key = (id(metric), api, result)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = metric.labels(self.sidecar_id, api, result)
        c.inc(n)

    def fresh_hit(self, api: str, target: str, h: Mapping[str, str]) -> bytes | None:
        """The whole answer (``X-Cache: HIT``) when a fresh stored response of ``api``
        answers this request as it is, with nothing to negotiate; else None (the ordinary
        path: :meth:`serve`). What a hit costs is this dictionary work and one write; its
        count reaches the metric at the next :meth:`flush_counts` (the edge's tick)."""
        store = self.stores.get(api)
        if store is None or self.head is None:
            return None
        for name in self._not_fast:
            if name in h:
                return None
        e = store.get(target, h)
        if e is None:
            return None
        now = self.clock()
        f = e.fresh
        age = f.initial_age_s + max(0.0, now - e.stored_at)
        if age >= f.lifetime_s:
            return None
        head = e.head
        if head is None:
            head = e.head = self.head(e)
        if not head:
            return None
        if self.track_popular:
            self.popular[api].seen(target, now)
        hits = self.fast_hits
        hits[api] = hits.get(api, 0) + 1
        return b"".join((head, b"Age: %d\r\n\r\n" % age, e.body))

    def passes(self, api: str, target: str) -> bool:
        """Should this request go straight to the origin (its key's last answer was not
        storable, less than :data:`PASS_S` ago)? Counted as a miss, and not stored for
        the reason the last answer was not."""
        p = self.passing.get((api, target))
        if p is None:
            return False
        if self.clock() >= p[0]:
            del self.passing[(api, target)]
            return False
        self.count(api, "miss")
        self.count(api, p[1], m.CACHE_NOT_STORED)
        return True

    def flush_counts(self) -> None:
        """Add the fast path's hits to the lookup metric."""
        hits, self.fast_hits = self.fast_hits, {}
        for api, n in hits.items():
            self.count(api, "hit", n=n)



class EdgeCache(Shortcuts):
    """Response caches of the proxied APIs (one bounded store per API)."""

    def __init__(self, settings: EdgeCacheSettings, sidecar_id: str, origin: Origin, *,
                 credential_headers: tuple[str, ...] = (), finish: Finish | None = None,
                 head: Head | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.sidecar_id = sidecar_id
        self.origin = origin
        self.credential_headers = tuple(h.lower() for h in credential_headers if h)
        self.finish = finish
        self.head = head
        self.clock = clock
        self._not_fast = (*_NOT_FAST, *self.credential_headers)
        self.track_popular = False  # request counts per key (for warming)
        self.stores: dict[str, CacheStore] = {}
        self.popular: dict[str, KeyFrequency] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._counters: dict[tuple[int, str, str], m.Counter] = {}
        self.fast_hits: dict[str, int] = {}  # hits of the fast path not yet counted
        # (api, target) -> until when its requests go straight to the origin: its last
        # answer was not storable for any request (a cache may always forward; single
        # flight collapses only what may be shared). Bounded; rechecked after PASS_S.
        self.passing: dict[tuple[str, str], tuple[float, str]] = {}  # (until, why)

    def caches(self, api: str) -> bool:
        """Is ``api`` cached at all?"""
        return self.settings.enabled and (not self.settings.apis or api in self.settings.apis)

    def store(self, api: str) -> CacheStore:
        s = self.stores.get(api)
        if s is None:
            s = self.stores[api] = CacheStore(self.settings.max_bytes,
                                              self.settings.max_object_bytes)
            self.popular[api] = KeyFrequency()
        return s

    # ------------------------------------------------------------------ serving

    async def serve(self, request: web.BaseRequest, route: Route,
                    target: str) -> web.StreamResponse:
        """Answer a cacheable GET from the cache or through one origin flight."""
        api = route.api
        store = self.store(api)
        h = request.headers
        if self.track_popular:
            self.popular[api].seen(target, self.clock())
        revalidate = must_revalidate_request(h)
        credentials = has_credentials(h, self.credential_headers)
        e = self._usable(store.get(target, h), credentials)
        now = self.clock()
        if e is not None and not revalidate:
            state = e.fresh.state(now - e.stored_at)
            if state == "fresh":
                self.count(api, "hit")
                return self._from_store(request, e, "HIT", now)
            if state == "swr":
                self.count(api, "stale")
                self.refresh_behind(route, target, e, "background")
                return self._from_store(request, e, "STALE", now)
        fk = (api, target)
        waiting = self._inflight.get(fk)
        if waiting is not None:
            await asyncio.shield(waiting)
            e = self._usable(store.get(target, h), credentials)
            now = self.clock()
            if e is not None and e.fresh.state(now - e.stored_at) == "fresh":
                self.count(api, "collapsed")
                return self._from_store(request, e, "HIT", now)
            return await self._fetch(request, route, target, e)  # not shareable: our own
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[fk] = fut
        try:
            return await self._fetch(request, route, target, e)
        finally:
            del self._inflight[fk]
            fut.set_result(None)

    @staticmethod
    def _usable(e: StoredResponse | None, credentials: bool) -> StoredResponse | None:
        """``e`` unless the request carries credentials and ``e`` may not answer it."""
        if e is None or not credentials or serves_credentials(e.header_map()):
            return e
        return None

    async def _fetch(self, request: web.BaseRequest, route: Route, target: str,
                     e: StoredResponse | None) -> web.StreamResponse:
        api = route.api
        h = request.headers
        headers = [(k, v) for k, v in h.items() if k.lower() not in _NOT_FORWARDED]
        kind = "fetch"
        if e is not None:
            cond = conditional_headers(e.header_map())
            if cond:
                headers += list(cond.items())
                kind = "revalidate"
        self.count(api, kind, m.CACHE_ORIGIN)
        got = await self.origin(route, target, headers, request)
        now = self.clock()
        if isinstance(got, Fetched):
            if got.status == 304 and e is not None:
                revalidated(e, got, now)
                self.count(api, "revalidated")
                return self._from_store(request, e, "REVALIDATED", now)
            if got.status >= 500 and e is not None and e.fresh.state(now - e.stored_at) != \
                    "stale":
                self.count(api, "stale")
                return self._from_store(request, e, "STALE", now)
            stored = self._keep(api, target, h, got, now)
            self.count(api, "miss")
            resp = web.Response(status=got.status, reason=got.reason, body=got.body,
                                headers=got.headers)
            if self.settings.x_cache_header:
                resp.headers[X_CACHE] = "MISS"
            return self.finish(request, resp, stored) if self.finish else resp
        failed = got is None or (got.status >= 500 and not got.prepared)
        if failed and e is not None and e.fresh.state(now - e.stored_at) != "stale":
            self.count(api, "stale")  # stale-if-error (or still within swr)
            return self._from_store(request, e, "STALE", now)
        self.count(api, "miss")
        if got is None:
            return web.json_response({"error": "no_endpoint", "message": "origin failed"},
                                     status=502)
        return got

    def _keep(self, api: str, target: str, req_headers: Mapping[str, str], got: Fetched,
              now: float) -> StoredResponse | None:
        why = why_not_storable(
            "GET", got.status, got.headers, req_headers,
            credentials=has_credentials(req_headers, self.credential_headers))
        if why is not None:
            self.count(api, why, m.CACHE_NOT_STORED)
            if why != "credentials":  # about the response, not this request
                if len(self.passing) >= MAX_PASSING:
                    self.passing.clear()
                self.passing[(api, target)] = (now + PASS_S, why)
            return None
        store = self.store(api)
        e = StoredResponse(got.status, tuple(got.headers.items()), got.body, now,
                           freshness(got.headers))
        before = store.evictions
        if not store.put(target, req_headers, e):
            m.CACHE_NOT_STORED.labels(self.sidecar_id, api, "too-big").inc()
            return None
        if store.evictions > before:
            m.CACHE_EVICTIONS.labels(self.sidecar_id, api).inc(store.evictions - before)
        m.CACHE_BYTES.labels(self.sidecar_id, api).set(store.bytes)
        return e

    def charge(self, e: StoredResponse) -> None:
        """Charge a stored response again after a compressed copy was added to it."""
        for api, store in self.stores.items():
            if any(v is e for v in store.variants(e.key)):
                store.resize(e.key, dict(e.request_headers))
                m.CACHE_BYTES.labels(self.sidecar_id, api).set(store.bytes)

    def _from_store(self, request: web.BaseRequest, e: StoredResponse, result: str,
                    now: float) -> web.Response:
        headers = CIMultiDict(e.headers)
        headers["Age"] = str(int(e.fresh.initial_age_s + max(0.0, now - e.stored_at)))
        if self.settings.x_cache_header:
            headers[X_CACHE] = result
        if e.status == 200 and client_not_modified(request.headers, headers):
            for k in ("Content-Type", "Content-Encoding"):
                headers.popall(k, None)
            return web.Response(status=304, headers=headers)
        resp = web.Response(status=e.status, body=e.body, headers=headers)
        return self.finish(request, resp, e) if self.finish else resp

    # ------------------------------------------------------------------ background

    def refresh_behind(self, route: Route, target: str, e: StoredResponse, kind: str) -> bool:
        """Revalidate ``e`` in the background unless a flight for it is under way."""
        fk = (route.api, target)
        if fk in self._inflight:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[fk] = fut

        async def run() -> None:
            try:
                await self._refresh(route, target, e, kind)
            except Exception:  # a background refresh must never take the proxy down
                log.exception("background refresh of %s %s failed", route.api, target)
            finally:
                del self._inflight[fk]
                fut.set_result(None)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _refresh(self, route: Route, target: str, e: StoredResponse, kind: str) -> None:
        headers = [*e.request_headers, *conditional_headers(e.header_map()).items()]
        self.count(route.api, kind, m.CACHE_ORIGIN)
        got = await self.origin(route, target, headers, None)
        now = self.clock()
        if not isinstance(got, Fetched):
            return
        if got.status == 304:
            revalidated(e, got, now)
        elif got.status < 500:
            self._keep(route.api, target, dict(e.request_headers), got, now)

    async def close(self) -> None:
        """Cancel background refreshes; count the last fast hits."""
        self.flush_counts()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t
