"""The built-in data plane: an aiohttp reverse proxy driven by the :class:`Router`.

Per request: pick the API (``X-Loadcast-Api`` header or first path segment), maybe shed
it, choose an endpoint, forward over a pooled keep-alive connection, and stream the
response back. Bodies are streamed both ways (small ones are read whole: fewer writes);
``Content-Encoding`` passes through untouched (no decompression), and with
``compress_responses`` uncompressed text responses are gzipped for clients that accept it.

Request targets: only the path and query of a request ever reach an upstream, always on
the chosen endpoint's configured host and port. Origin-form targets (``/path?q``, also
``//host/x``, which is a path here, not a host) are forwarded as they are; an absolute-form
target (``http://host:port/path``) is accepted only when its host and port are one of the
configured upstreams (400 otherwise); ``CONNECT`` gets 405, any other form 400. The
sidecar is never an open proxy.

Failures: a connection that is refused (nothing sent) goes to the next endpoint for any
method; a connection dropped after the request was sent is retried only for idempotent
methods, otherwise the client gets a 502 that says so. No endpoint left: 503 with
Retry-After.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.http import RawRequestMessage
from multidict import CIMultiDict
from yarl import URL

from streams.sidecar import metrics as m
from streams.sidecar.director import REGION_HEADER, MirrorDirector, valid_region
from streams.sidecar.edge_cache import X_CACHE, Fetched
from streams.sidecar.fastpath import SUPPORTED as FAST_SUPPORTED
from streams.sidecar.fastpath import FastServer
from streams.sidecar.policies import Endpoint
from streams.sidecar.relay import Upstreams, relay
from streams.sidecar.router import DEFAULT_PRIORITY, Route, Router
from streams.sidecar.upstream import IDEMPOTENT, Answer, UpstreamConnectError

if TYPE_CHECKING:
    from streams.sidecar.edge import Edge

log = logging.getLogger(__name__)

API_HEADER = "X-Loadcast-Api"
DYNAMIC_HEADER = "X-Loadcast-Dynamic-Routing"
PRIORITY_HEADER = "X-Loadcast-Priority"
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Proxy-Connection",
    )
)
_DROP_REQ = HOP_BY_HOP | {"content-length"}
_DROP_RESP = HOP_BY_HOP | {"content-length"}
MAX_BUFFERED_BODY = 1 << 20  # request bodies up to 1 MiB are kept for retries


@dataclass
class Outcome:
    """What happened to one proxied request (for telemetry and decisions)."""

    route: Route
    endpoint: Endpoint | None
    status: int
    latency_ms: float
    attempts: int
    dynamic: bool
    connect_failure: bool = False


Observer = Callable[[Outcome], None]


class Forwarder:
    """Forwarding one request to one endpoint (and the next on a connection failure),
    the answer relayed, or read whole for the cache. :class:`Proxy` decides where."""

    router: Router
    sidecar_id: str
    max_attempts: int
    retry_after: str
    observe: Observer | None
    upstreams: Upstreams | None
    edge: Edge | None
    capture_limit: int
    _bases: dict[str, URL]
    _m: dict[tuple[str, str, str], Any]
    _urls: dict[tuple[str, str], URL]
    _lat: dict[str, Any]

    def _reject(self, route: Route | None, status: int, reason: str, message: str,
                retry_after: str | None = None) -> web.Response:
        api = route.api if route is not None else "-"
        m.REJECTED.labels(self.sidecar_id, api, reason).inc()
        headers = {"Retry-After": retry_after} if retry_after else None
        return web.json_response(
            {"error": reason, "message": message}, status=status, headers=headers
        )

    def _url(self, ep: Endpoint, path: str) -> URL:
        # Parsing a URL per request is a measurable share of the proxy's CPU: keep the
        # hot ones (bounded).
        key = (ep.id, path)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= 4096:
                self._urls.clear()
            base = self._bases.get(ep.id)
            if base is None:  # a mirror added at run time by the director
                base = self._bases[ep.id] = URL(ep.url)
            # never ``base.join(target)``: a ``//host`` or absolute target would replace
            # the host. Only path and query go upstream, on the endpoint's own origin.
            p, _, q = path.partition("?")
            url = self._urls[key] = URL.build(
                scheme=base.scheme, host=base.raw_host or "", port=base.port, path=p,
                query_string=q, encoded=True,
            )
        return url

    def _count(self, api: str, endpoint: str, outcome: str) -> None:
        key = (api, endpoint, outcome)
        c = self._m.get(key)
        if c is None:
            c = self._m[key] = m.REQUESTS.labels(self.sidecar_id, api, endpoint, outcome)
        c.inc()

    async def _forward(self, request: web.BaseRequest | None, route: Route, ep: Endpoint,
                       dynamic: bool, t0: float, path: str,
                       fwd_headers: list[tuple[str, str]] | None = None,
                       capture: bool | str = False) -> Any:
        method = request.method if request is not None else "GET"
        idempotent = method in IDEMPOTENT
        body: Any = None
        replayable = True
        if request is not None and request.body_exists:
            n = request.content_length
            if n is not None and n <= MAX_BUFFERED_BODY:
                body = await request.read()
            else:
                body = request.content  # streamed: cannot be sent twice
                replayable = False
        src = fwd_headers if fwd_headers is not None else request.headers.items()  # type: ignore[union-attr]
        headers = [(k, v) for k, v in src if k.lower() not in _DROP_REQ]
        peer = request.remote if request is not None else None
        if peer:
            headers.append(("X-Forwarded-For", peer))
        tried: list[Endpoint] = []
        failure: Exception
        attempts = 0
        assert self.upstreams is not None
        while True:
            attempts += 1
            tried.append(ep)
            start = time.monotonic()
            ep.in_flight += 1
            try:
                resp = await self.upstreams.send(method, self._url(ep, path), headers, body)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError,
                    UpstreamConnectError) as e:
                # refused / unreachable: nothing was sent, any method may go elsewhere
                ep.in_flight -= 1
                failure, sent = e, False
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                    aiohttp.ClientPayloadError) as e:
                ep.in_flight -= 1
                failure, sent = e, True
            except TimeoutError:
                ep.in_flight -= 1
                now = time.monotonic()
                self.router.failed(ep, now, (now - start) * 1000)
                self._done(route, ep, 504, start, attempts, dynamic, "timeout")
                return self._reject(route, 504, "timeout",
                                    f"endpoint {ep.id} did not answer in time")
            else:
                try:
                    return await self._respond(request, route, ep, resp, start, attempts,
                                               dynamic, capture)
                finally:
                    ep.in_flight -= 1
            # a connection failure: count it, maybe eject, maybe try the next endpoint
            now = time.monotonic()
            if self.router.failed(ep, now):
                m.EJECTIONS.labels(self.sidecar_id, ep.id).inc()
                log.warning("ejected %s after %d consecutive failures", ep.id,
                            self.router.eject_after)
            self._done(route, ep, 0, start, attempts, dynamic, "connect_failure", True)
            if sent and not (idempotent and replayable):
                return self._reject(
                    route, 502, "sent_then_failed",
                    f"endpoint {ep.id} dropped the connection after the {method} request "
                    f"was sent ({type(failure).__name__}); not retried: it may have taken "
                    "effect",
                )
            nxt = None
            if attempts < self.max_attempts:
                nxt = self.router.next_after(route, tried, dynamic, now)
            if nxt is None:
                break
            m.RETRIES.labels(self.sidecar_id, route.api).inc()
            ep = nxt
        return self._reject(route, 503, "no_endpoint",
                            f"no endpoint of API {route.api} accepted the connection "
                            f"({attempts} tried)", self.retry_after)

    def _done(self, route: Route, ep: Endpoint, status: int, start: float, attempts: int,
              dynamic: bool, outcome: str, connect_failure: bool = False) -> None:
        latency_ms = (time.monotonic() - start) * 1000
        self._count(route.api, ep.id, outcome)
        if self.observe is not None:
            self.observe(Outcome(route, ep, status, latency_ms, attempts, dynamic,
                                 connect_failure))

    async def _respond(self, request: web.BaseRequest | None, route: Route, ep: Endpoint,
                       resp: Answer, start: float, attempts: int,
                       dynamic: bool, capture: bool | str = False) -> Any:
        try:  # every way out gives the upstream connection back
            now = time.monotonic()
            rtt_ms = (now - start) * 1000
            status = resp.status
            if status >= 500:
                self.router.failed(ep, now, rtt_ms)
            else:
                self.router.succeeded(ep, rtt_ms, now)
            self._lat[route.api].observe(rtt_ms / 1000)
            self._done(route, ep, status, start, attempts, dynamic,
                       "ok" if status < 500 else "error")
            out_headers = CIMultiDict(
                (k, v) for k, v in resp.headers.items() if k.lower() not in _DROP_RESP
            )
            n = resp.content_length
            if capture is True and (status == 304 or (n is not None
                                                      and n <= self.capture_limit)):
                return Fetched(status, resp.reason, out_headers, await resp.read())
            if request is None:
                return None  # a background refresh of something too big to store
            if isinstance(capture, str):  # the cache passed it through: say what it was
                out_headers[X_CACHE] = capture
            coding = None if self.edge is None else self.edge.coding(request, status,
                                                                     out_headers, n)
            return await relay(request, resp, out_headers, coding)
        except ConnectionResetError as e:  # the client went away mid-response
            log.debug("client left during the response from %s: %s", ep.id, e)
            raise
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError) as e:
            # the body broke off midway: nothing sensible can be sent after headers
            log.warning("endpoint %s broke off the response body: %s", ep.id, e)
            raise
        finally:
            resp.release()


class Proxy(Forwarder):
    """The proxy's aiohttp server and its way to the upstreams."""

    def __init__(
        self,
        router: Router,
        *,
        sidecar_id: str,
        dynamic_routing: bool = True,
        connect_timeout_s: float = 1.0,
        request_timeout_s: float = 30.0,
        pool_size: int = 256,
        max_attempts: int = 3,
        retry_after_s: int = 1,
        observe: Observer | None = None,
        director: MirrorDirector | None = None,
        region: str = "central",
        edge: Callable[[Proxy], Edge] | None = None,
        arrival: Callable[[str, str], None] | None = None,
    ) -> None:
        self.router = router
        self.sidecar_id = sidecar_id
        self.dynamic_routing = dynamic_routing
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.pool_size = pool_size
        self.max_attempts = max_attempts
        self.retry_after = str(retry_after_s)
        self.observe = observe
        self.director = director  # edge mirrors by request region (X-Loadcast-Region)
        self.region = region
        self.arrival = arrival  # (api, region) of each request that needs an origin
        self.upstreams: Upstreams | None = None
        self._bases = {e.id: URL(e.url) for e in router.endpoints.values()}
        # absolute-form targets may name only these (scheme, host, port)
        self._authorities = {_authority(u) for u in self._bases.values()}
        self._m: dict[tuple[str, str, str], Any] = {}
        self._urls: dict[tuple[str, str], URL] = {}
        self._lat = {api: m.LATENCY.labels(sidecar_id, api) for api in router.routes}
        # cache, compression, rate limits, warming (None: all off, the plain path)
        built = edge(self) if edge is not None else None
        self.edge: Edge | None = built if built is not None and built.active else None
        self.capture_limit = built.settings.cache.max_object_bytes if built else 0

    def server(self) -> web.Server:
        """The low-level aiohttp server (no router or middlewares: every path is ours);
        with the response cache on, fresh hits are answered as requests are parsed
        (:mod:`streams.sidecar.fastpath`). Call :meth:`open` before serving and
        :meth:`close` after."""
        if self.edge is not None and self.edge.settings.cache.enabled and FAST_SUPPORTED:
            return FastServer(self.handle, self.answer)
        return web.Server(self.handle)

    def answer(self, msg: RawRequestMessage, peer: str | None) -> bytes | None:
        """The fast path's question: a fresh hit's whole answer for this parsed GET, or
        None (the ordinary path, :meth:`handle`, answers it)."""
        path = msg.path
        if self.edge is None or not path.startswith("/") or "#" in path:
            return None
        h = msg.headers
        if DYNAMIC_HEADER in h or PRIORITY_HEADER in h:
            return None  # their values are checked on the ordinary path
        route = self.router.route_for(h.get(API_HEADER), path.partition("?")[0])
        if route is None or route.api not in self.edge.fast_apis:
            return None
        return self.edge.cache.fresh_hit(route.api, path, h)

    async def open(self) -> None:
        if self.upstreams is None:
            self.upstreams = Upstreams(self.pool_size, self.connect_timeout_s,
                                       self.request_timeout_s)
        if self.edge is not None:
            await self.edge.start()

    async def close(self) -> None:
        if self.edge is not None:
            await self.edge.close()
        if self.upstreams is not None:
            await self.upstreams.close()
            self.upstreams = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        h = request.headers
        target, status, why = origin_target(request.method, request.raw_path,
                                           self._authorities)
        if target is None:
            return self._reject(None, status,
                                "method_not_allowed" if status == 405 else "bad_target", why)
        route = self.router.route_for(h.get(API_HEADER), target.partition("?")[0])
        if route is None:
            known = ", ".join(self.router.routes)
            return self._reject(
                None, 400, "bad_request",
                f"unknown API {h.get(API_HEADER)!r} in {API_HEADER}; known: {known}",
            )
        opts = request_options(h, self.dynamic_routing)
        if isinstance(opts, str):
            return self._reject(route, 400, "bad_request", opts)
        dynamic, prio = opts
        edge = self.edge
        if edge is not None:
            limited = edge.limit(route, request)
            if limited is not None:
                return limited
            if edge.cacheable(route, request):
                if not edge.cache.passes(route.api, target):
                    return await edge.serve(request, route, target)
                # its last answer was not storable: relayed, marked as the miss it is
                mark = "MISS" if edge.settings.cache.x_cache_header else False
                return await self._route(request, route, target, dynamic, prio, None, mark)
        return await self._route(request, route, target, dynamic, prio, None, False)

    async def fetch(self, route: Route, target: str, headers: list[tuple[str, str]],
                    request: web.BaseRequest | None) -> Fetched | web.StreamResponse | None:
        """The cache's way to the origin: route and forward, the answer read whole when it
        is small enough to store (else relayed to ``request``, or dropped without one)."""
        dynamic, prio = (self.dynamic_routing, DEFAULT_PRIORITY)
        if request is not None:
            opts = request_options(request.headers, self.dynamic_routing)
            if not isinstance(opts, str):
                dynamic, prio = opts
        return await self._route(request, route, target, dynamic, prio, headers, True)

    async def _route(self, request: web.BaseRequest | None, route: Route, target: str,
                     dynamic: bool, prio: int, fwd_headers: list[tuple[str, str]] | None,
                     capture: bool | str) -> Any:
        h: Mapping[str, str] = request.headers if request is not None else {}
        now = time.monotonic()
        ep = None
        region = self.region
        if self.director is not None:
            reg_h = h.get(REGION_HEADER)
            if reg_h is not None:
                if not valid_region(reg_h):
                    return self._reject(route, 400, "bad_request",
                                        f"{REGION_HEADER} must be a region name (letters, "
                                        f"digits, '_.:-', at most 100), got {reg_h[:120]!r}")
                region = reg_h
            if dynamic:  # the seeds' director: the region's mirror when central will not do
                ep = self.director.choose(route, region, now, int(time.time()))
        if self.arrival is not None:  # demand, whatever serves it (or sheds it)
            self.arrival(route.api, region)
        if ep is None and self.router.should_shed(route, prio, now):
            return self._reject(route, 503, "shed",
                                "offered load exceeds the API's capacity; low-priority "
                                "request shed", self.retry_after)
        if ep is None:
            ep = self.router.choose(route, dynamic, now)
        if ep is None and self.director is not None:
            ep = self.director.fallback(route, region, now, int(time.time()))
        if ep is None:
            wait = max(1, round(self.router.readmit_in(route, now)))
            return self._reject(route, 503, "no_endpoint",
                                f"no endpoint of API {route.api} can take the request",
                                str(wait))
        return await self._forward(request, route, ep, dynamic, now, target, fwd_headers,
                                   capture)


def request_options(h: Mapping[str, str], dynamic: bool) -> tuple[bool, int] | str:
    """(dynamic routing, priority) from the request headers (``dynamic``: the default),
    or what is wrong with them.

    >>> request_options({"X-Loadcast-Priority": "2"}, True)
    (True, 2)
    >>> request_options({"X-Loadcast-Dynamic-Routing": "maybe"}, True)
    "X-Loadcast-Dynamic-Routing must be 'on' or 'off', got 'maybe'"
    """
    dyn_h = h.get(DYNAMIC_HEADER)
    if dyn_h is not None:
        v = dyn_h.strip().lower()
        if v not in ("on", "off"):
            return f"{DYNAMIC_HEADER} must be 'on' or 'off', got {dyn_h!r}"
        dynamic = v == "on"
    prio = DEFAULT_PRIORITY
    prio_h = h.get(PRIORITY_HEADER)
    if prio_h is not None:
        if not (prio_h.isdigit() and len(prio_h) == 1):
            return f"{PRIORITY_HEADER} must be a digit 0-9, got {prio_h!r}"
        prio = int(prio_h)
    return dynamic, prio


def origin_target(method: str, raw: str, authorities: Set[tuple[str, str, int | None]],
              ) -> tuple[str | None, int, str]:
    """The origin-form path (with query) to forward for request target ``raw``, or
    None with the status and message of the refusal; an absolute-form target must name
    one of ``authorities`` (scheme, host, port)."""
    if method == "CONNECT":
        return None, 405, "CONNECT is not supported: this is a reverse proxy, not a tunnel"
    raw = raw.partition("#")[0]
    if raw.startswith("/"):
        return raw, 200, ""
    if "://" in raw[:16]:
        try:
            u = URL(raw, encoded=True)
        except ValueError:
            return None, 400, f"unparseable request target {raw[:200]!r}"
        if not u.is_absolute() or _authority(u) not in authorities:
            return None, 400, (f"absolute-form request target names {u.scheme}://"
                               f"{u.raw_authority} which is not an upstream of this "
                               "sidecar; send an origin-form path")
        path = u.raw_path or "/"
        return (path + "?" + u.raw_query_string if u.raw_query_string else path), 200, ""
    return None, 400, f"request target must be a path starting with '/', got {raw[:200]!r}"


def _authority(u: URL) -> tuple[str, str, int | None]:
    return (u.scheme.lower(), (u.host or "").lower(), u.port)


async def serve(app: web.Application | web.Server, host: str,
                port: int) -> tuple[web.BaseRunner, int]:
    """Start ``app`` on ``host:port`` (0 = free port); returns the runner and the port."""
    runner: web.BaseRunner
    if isinstance(app, web.Server):
        runner = web.ServerRunner(app, handle_signals=False, shutdown_timeout=2.0)
    else:
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    await site.start()
    server = site._server
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    bound = int(sockets[0].getsockname()[1]) if sockets else port
    return runner, bound
