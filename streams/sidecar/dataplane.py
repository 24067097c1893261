"""The sidecar's data plane: whatever routes the requests by the sidecar's weights.

One protocol, :class:`DataPlane` (start, stop, apply a weight change, read counters), and
three implementations, picked by ``sidecar.data_plane``:

- ``proxy``: the built-in aiohttp proxy (:mod:`streams.sidecar.proxy_plane`); it sees
  every request, so it feeds telemetry per request, sheds, and sends regions to their
  edge mirrors (``mirrors = True``);
- ``haproxy``: a HAProxy process, weights through its runtime API
  (:mod:`streams.sidecar.haproxy_plane`);
- ``envoy``: an Envoy process, weights through file-based EDS
  (:mod:`streams.sidecar.envoy`).

The :class:`streams.sidecar.app.Sidecar` only talks to this protocol; which data plane
it has is looked up once in :data:`streams.sidecar.planes.DATA_PLANES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from streams.sidecar.config import SidecarSettings, Upstream
from streams.sidecar.director import MirrorDirector
from streams.sidecar.proxy import Outcome
from streams.sidecar.router import Router
from streams.sidecar.weights import WeightChange


class DataPlaneError(RuntimeError):
    """The data plane could not be started, refused a change, or died."""


class Telemetry(Protocol):
    """Where a data plane that routes on its own reports what its upstreams answered (the
    edge agent)."""

    def record(self, endpoint_id: str, latency_ms: float, status: int, *,
               api: str | None = None, connect_failure: bool = False,
               count: int = 1) -> None: ...


@dataclass
class PlaneContext:
    """What a data plane is built from."""

    sidecar_id: str
    settings: SidecarSettings
    upstreams: list[Upstream]
    router: Router
    observe: Callable[[Outcome], None]  # per-request outcomes (planes that see requests)
    director: MirrorDirector | None = None  # edge mirrors (planes with ``mirrors``)
    # forecast demand / known capacity per API (next step, peak over the horizon), and the
    # API's CONFIGURED/LEARNED capacity: what the edge's limits and warming follow
    pressure: Callable[[str], tuple[float, float]] | None = None
    capacity: Callable[[str], float | None] | None = None
    # (api, region) of every request that needs an origin (planes that see requests):
    # the region's demand series, counted before any routing choice
    arrival: Callable[[str, str], None] | None = None


class DataPlane(Protocol):
    """Routes the requests; the sidecar starts it, stops it and sends it weight changes."""

    mirrors: ClassVar[bool]  # chooses per request itself (edge mirrors, shedding)
    port: int  # where it accepts requests (after start)

    def __init__(self, ctx: PlaneContext) -> None: ...

    async def start(self, telemetry: Telemetry | None) -> None:
        """Start (or attach); report upstream answers to ``telemetry`` when given."""

    async def stop(self) -> None:
        """Stop what was started (an attached process is left running)."""

    def apply(self, change: WeightChange) -> None:
        """Take one API's new weights (non-blocking; pushed soon after)."""

    async def counters(self) -> dict[str, dict[str, int]]:
        """Requests each endpoint has taken so far, ``{api: {endpoint: n}}`` (HAProxy and
        Envoy count responses; the built-in proxy also counts failed attempts)."""

    def set_dynamic_routing(self, enabled: bool) -> None:
        """The default for requests without ``X-Loadcast-Dynamic-Routing``."""

    def alive(self) -> bool:
        """False once a process of our own has died."""

    def check(self) -> None:
        """Raise :class:`DataPlaneError` (with the log's tail) if it has died."""
