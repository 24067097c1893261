"""The built-in aiohttp proxy (:mod:`streams.sidecar.proxy`) as a :class:`DataPlane`.

It routes with the sidecar's own :class:`Router`, whose endpoint weights the sidecar
sets, so a weight change needs no push; it sees every request (telemetry per request,
shedding, edge mirrors).
"""

from __future__ import annotations

from typing import ClassVar

from aiohttp import web

from streams.sidecar.dataplane import PlaneContext, Telemetry
from streams.sidecar.edge import Edge
from streams.sidecar.proxy import Proxy, serve
from streams.sidecar.weights import WeightChange


class ProxyPlane:
    """The built-in proxy on ``listen_host:listen_port`` (0: a free port)."""

    mirrors: ClassVar[bool] = True

    def __init__(self, ctx: PlaneContext) -> None:
        s = ctx.settings
        self.settings = s
        self.router = ctx.router
        self.proxy = Proxy(
            ctx.router,
            sidecar_id=ctx.sidecar_id,
            dynamic_routing=s.dynamic_routing,
            connect_timeout_s=s.connect_timeout_s,
            request_timeout_s=s.request_timeout_s,
            pool_size=s.pool_size,
            max_attempts=s.max_attempts,
            retry_after_s=s.retry_after_s,
            observe=ctx.observe,
            director=ctx.director,
            region=s.region,
            arrival=ctx.arrival,
            edge=lambda proxy: Edge(s, ctx.sidecar_id, ctx.router.routes, proxy.fetch,
                                    pressure=ctx.pressure, capacity=ctx.capacity),
        )
        self.port = 0
        self._runner: web.BaseRunner | None = None

    async def start(self, telemetry: Telemetry | None) -> None:
        """Serve; telemetry comes per request through the context's ``observe``."""
        await self.proxy.open()
        self._runner, self.port = await serve(self.proxy.server(), self.settings.listen_host,
                                              self.settings.listen_port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.proxy.close()

    def apply(self, change: WeightChange) -> None:
        """Nothing to push: the router's endpoints carry the weights."""

    async def counters(self) -> dict[str, dict[str, int]]:
        return {api: {e.id: e.requests for e in r.endpoints}
                for api, r in self.router.routes.items()}

    def set_dynamic_routing(self, enabled: bool) -> None:
        self.proxy.dynamic_routing = enabled

    def alive(self) -> bool:
        return True

    def check(self) -> None:
        """In-process: it cannot die on its own."""
