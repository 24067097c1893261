"""KEDA's External Scaler (gRPC) over the API's :class:`ForecastState`: a ``ScaledObject``
of type ``external`` scales a Deployment on the **forecast** demand of an api/region.

Served with ``grpc.aio`` on the API's event loop, so every call reads the state without
threads or locks. The arithmetic (metadata, demand at the lead time) is
:mod:`processors.autoscaling`; this module maps it to the protocol:

- ``GetMetricSpec``: one metric, target ``targetPerReplica`` (KEDA: replicas =
  ceil(demand / target));
- ``GetMetrics``: the forecast demand at now + ``leadSeconds``;
- ``IsActive``: demand > ``activationThreshold`` (default 0);
- ``StreamIsActive``: the activity now, then each flip (checked on every state change and at
  least every second, as time moves the lead point), until the client cancels;
- ``StreamMetricSpec`` (optional in the protocol): UNIMPLEMENTED, on which KEDA polls
  ``GetMetricSpec``, whose target never changes for given metadata.

Errors are gRPC statuses: bad or missing metadata -> ``INVALID_ARGUMENT`` naming the key;
no score for the api (in the region) -> ``NOT_FOUND``. NOT_FOUND, not "0 and inactive": on
an error KEDA keeps the replicas it has (or its ``fallback``), while 0 would scale the
Deployment down, to zero with ``minReplicaCount: 0``, e.g. just after the API restarted.
A stale forecast (past ``valid_until``) counts the endpoint's current rate, with a warning
in the log (at most once a minute per metric).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc
from grpc import aio
from prometheus_client import Counter

from processors.autoscaling import Demand, MetadataError, ScalerQuery, demand_at, parse_metadata
from streams.api.keda import externalscaler_pb2 as pb
from streams.api.keda import externalscaler_pb2_grpc as pb_grpc
from streams.api.state import ForecastState

log = logging.getLogger(__name__)

STREAM_POLL_S = 1.0
STALE_LOG_EVERY_S = 60.0

CALLS = Counter("loadcast_api_keda_calls_total",
                "KEDA external-scaler calls answered, by method and gRPC status code",
                ["method", "code"])


class ScalerError(Exception):
    """A call that ends with a gRPC status (code and message)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ForecastScaler(pb_grpc.ExternalScalerServicer):
    """The servicer: answers from ``state`` (read on the event loop)."""

    def __init__(self, state: ForecastState, *, poll_s: float = STREAM_POLL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.poll_s = poll_s
        self.clock = clock
        self._stale_logged: dict[str, float] = {}  # metric name -> when last logged

    # ------------------------------------------------------------------ the arithmetic

    def query(self, ref: pb.ScaledObjectRef) -> ScalerQuery:
        """The trigger's query, or INVALID_ARGUMENT naming the bad key."""
        try:
            return parse_metadata(dict(ref.scalerMetadata))
        except MetadataError as e:
            who = f"ScaledObject {ref.namespace}/{ref.name}: " if ref.name else ""
            raise ScalerError(grpc.StatusCode.INVALID_ARGUMENT, f"{who}{e}") from None

    def demand(self, query: ScalerQuery) -> Demand:
        """Forecast demand of the query now, or NOT_FOUND without scores."""
        scores = self.state.find(api=query.api, region=query.region)
        if not scores:
            where = f" in region {query.region!r}" if query.region else ""
            raise ScalerError(grpc.StatusCode.NOT_FOUND,
                              f"no load score for api {query.api!r}{where} (yet)")
        now = self.clock()
        d = demand_at(scores, query, round(now * 1000))
        if d.stale:
            self._log_stale(query, d, now)
        return d

    def _log_stale(self, query: ScalerQuery, d: Demand, now: float) -> None:
        name = query.metric_name
        if now - self._stale_logged.get(name, -STALE_LOG_EVERY_S) < STALE_LOG_EVERY_S:
            return
        if len(self._stale_logged) > 10_000:  # bounded: one entry per metric in use
            self._stale_logged.clear()
        self._stale_logged[name] = now
        shown = ", ".join(d.stale[:5]) + (" ..." if len(d.stale) > 5 else "")
        log.warning("keda %s: forecast stale (past valid_until) or missing for %d of %d "
                    "endpoints (%s): their current rate is used instead", name,
                    len(d.stale), d.endpoints, shown)

    # ------------------------------------------------------------------ the protocol

    async def _fail(self, method: str, e: ScalerError,
                    context: aio.ServicerContext[object, object]) -> NoReturn:
        CALLS.labels(method, e.code.name).inc()
        await context.abort(e.code, str(e))
        raise AssertionError("abort returns by raising")  # pragma: no cover

    async def IsActive(self, request: pb.ScaledObjectRef,
                       context: aio.ServicerContext[object, object]) -> pb.IsActiveResponse:
        """Whether the forecast demand is above the activation threshold."""
        try:
            q = self.query(request)
            active = self.demand(q).is_active(q)
        except ScalerError as e:
            await self._fail("IsActive", e, context)
        CALLS.labels("IsActive", "OK").inc()
        return pb.IsActiveResponse(result=active)

    async def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.IsActiveResponse]:
        """The activity now, then every flip; ends when the client cancels (the task is
        cancelled) or with the status of an error."""
        last: bool | None = None
        try:
            q = self.query(request)
            while True:
                version = self.state.version
                active = self.demand(q).is_active(q)
                if active != last:
                    last = active
                    yield pb.IsActiveResponse(result=active)
                await self.state.changed(version, self.poll_s)
        except ScalerError as e:
            await self._fail("StreamIsActive", e, context)

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext[object, object],
    ) -> pb.GetMetricSpecResponse:
        """One metric whose target is the requests/s one replica serves."""
        try:
            q = self.query(request)
        except ScalerError as e:
            await self._fail("GetMetricSpec", e, context)
        CALLS.labels("GetMetricSpec", "OK").inc()
        return pb.GetMetricSpecResponse(metricSpecs=[pb.MetricSpec(
            metricName=q.metric_name, targetSizeFloat=q.target_per_replica,
            targetSize=max(1, round(q.target_per_replica)))])

    async def StreamMetricSpec(
        self, request: pb.ScaledObjectRef, context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.GetMetricSpecResponse]:
        """Not served: the target is fixed by the metadata, so KEDA's documented fallback on
        UNIMPLEMENTED (polling ``GetMetricSpec``) is exact."""
        await self._fail("StreamMetricSpec", ScalerError(
            grpc.StatusCode.UNIMPLEMENTED, "the target is fixed by the metadata: "
            "use GetMetricSpec"), context)
        yield pb.GetMetricSpecResponse()  # pragma: no cover (makes this a stream handler)

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: aio.ServicerContext[object, object],
    ) -> pb.GetMetricsResponse:
        """The forecast demand (requests/s) at now + ``leadSeconds``."""
        try:
            q = self.query(request.scaledObjectRef)
            d = self.demand(q)
        except ScalerError as e:
            await self._fail("GetMetrics", e, context)
        CALLS.labels("GetMetrics", "OK").inc()
        return pb.GetMetricsResponse(metricValues=[pb.MetricValue(
            metricName=request.metricName or q.metric_name, metricValueFloat=d.rps,
            metricValue=round(d.rps))])


async def start_scaler(state: ForecastState, host: str, port: int, *,
                       max_concurrent_rpcs: int, poll_s: float = STREAM_POLL_S,
                       ) -> tuple[aio.Server, int]:
    """Start the gRPC server of the scaler on the running loop; (server, bound port)."""
    # no SO_REUSEPORT (grpc's default): a second process on a taken port must fail, not
    # silently share the port with the first
    server = aio.server(maximum_concurrent_rpcs=max_concurrent_rpcs,
                        options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ExternalScalerServicer_to_server(ForecastScaler(state, poll_s=poll_s), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # grpcio raises when the port is taken
        bound, why = 0, str(e)
    else:
        why = "port not bound"
    if bound == 0:
        raise OSError(f"keda scaler: cannot listen on {host}:{port}: {why}")
    await server.start()
    return server, bound
