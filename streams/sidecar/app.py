"""Wiring of the routing sidecar: scores in, weights out to a data plane, telemetry and
decisions back to Kafka, an admin server beside it.

>>> import asyncio                                               # doctest: +SKIP
>>> sc = Sidecar(SidecarSettings(upstreams=[...]), kafka_settings)  # doctest: +SKIP
>>> asyncio.run(sc.run_forever(stop_event))                          # doctest: +SKIP

Everything runs on one asyncio loop (uvloop when available) except the Kafka score
consumer and the edge agent's flush loop, which have a thread each; score batches come
back to the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import threading
import time
from typing import Any

from aiohttp import web

from schemas.codec import Codec
from streams.edge.agent import TelemetryInputError
from streams.kafka.registry import codec_for
from streams.kafka.settings import KafkaSettings
from streams.sidecar import metrics as m
from streams.sidecar.admin import admin_app, health_view, weights_view
from streams.sidecar.config import SidecarSettings, Upstream, UpstreamConfigError
from streams.sidecar.dataplane import DataPlane, PlaneContext
from streams.sidecar.director import MirrorDirector
from streams.sidecar.edge import table_capacity, table_pressure
from streams.sidecar.kafka_parts import SidecarKafka
from streams.sidecar.planes import DATA_PLANES
from streams.sidecar.proxy import Outcome, serve
from streams.sidecar.router import Router
from streams.sidecar.scores import Batch, ScoreSubscriber
from streams.sidecar.weights import WeightChange, WeightTable

log = logging.getLogger(__name__)

STALE_TICK_S = 0.05  # how often validity times are checked


def now_ms() -> int:
    return int(time.time() * 1000)


class Sidecar:
    """One routing sidecar. ``kafka=None`` runs without scores, telemetry or decisions
    (a plain reactive proxy)."""

    def __init__(
        self,
        settings: SidecarSettings,
        kafka: KafkaSettings | None,
        *,
        codec: Codec | None = None,
        sidecar_id: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = s = settings
        self.upstreams: list[Upstream] = s.resolved_upstreams()
        if not self.upstreams:
            raise UpstreamConfigError("sidecar.upstreams: no upstream endpoints configured")
        self.id = sidecar_id or s.sidecar_id or f"sidecar-{s.region}-{socket.gethostname()}"
        self.kafka = kafka
        self.codec = codec or codec_for(kafka.schema_registry_url if kafka else None)
        self.rng = rng or random.Random()
        self.router = Router(
            self.upstreams, policy=s.policy, fallback_policy=s.fallback_policy,
            eject_after_failures=s.eject_after_failures,
            eject_seconds=s.eject_seconds,
            max_ejected_share=s.max_ejected_share,
            shed_overload=s.shed_overload,
            # shedding must end within two score intervals after the offered rate falls
            rate_window_s=min(1.0, s.telemetry_interval_s / 2),
            rng=self.rng,
        )
        self.table = WeightTable(
            {api: [e.id for e in r.endpoints] for api, r in self.router.routes.items()},
            anomaly_damping=s.anomaly_damping,
            capacities={u.id: u.capacity_rps for u in self.upstreams},
            step_ms=round(s.telemetry_interval_s * 1000),  # the score interval
        )
        plane_type = DATA_PLANES[s.data_plane]
        self.director: MirrorDirector | None = None
        if s.director and plane_type.mirrors and kafka is not None:
            self.director = MirrorDirector(
                region=s.region, central_region=s.central_region,
                central_capacity_rps=s.central_capacity_rps, lookahead_s=s.mirror_lookahead_s,
                headroom=s.mirror_headroom, rng=self.rng, mirror_hosts=s.mirror_hosts,
            )
        self.bus = SidecarKafka(kafka, self.codec, self.id, s, self.upstreams) if kafka else None
        self.plane: DataPlane = plane_type(PlaneContext(
            self.id, s, self.upstreams, self.router, self._observe, self.director,
            pressure=table_pressure(self.table), capacity=table_capacity(self.table),
            arrival=self.bus.count_arrival if self.bus is not None and s.demand_series
            and s.region != s.central_region else None))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.admin_port = 0
        self.started_at = 0.0
        self.weight_changes = 0
        self.last_change_ms: dict[str, int] = {}
        self._runners: list[web.BaseRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._policy_gauge: dict[str, str] = {}
        self.policies_changed()

    @property
    def port(self) -> int:
        """Where the data plane accepts requests (after :meth:`start`)."""
        return self.plane.port

    @property
    def subscriber(self) -> ScoreSubscriber | None:
        """The score reader (None without Kafka or before :meth:`start`)."""
        return self.bus.subscriber if self.bus is not None else None

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the data plane, the admin server, and the Kafka parts."""
        s = self.settings
        self.loop = asyncio.get_running_loop()
        self.started_at = time.time()
        await self.plane.start(self.bus.start_agent() if self.bus is not None else None)
        runner, self.admin_port = await serve(admin_app(self), s.listen_host, s.admin_port)
        self._runners.append(runner)
        self._tasks.append(asyncio.create_task(self._stale_loop(), name="sidecar-stale"))
        if self.bus is not None:
            await self.bus.start_subscriber(self.deliver, mirror_statuses=bool(self.director))
        log.info("sidecar %s: %s on %s:%d, admin on :%d", self.id, s.data_plane,
                 s.listen_host, self.port, self.admin_port)

    async def stop(self) -> None:
        """Stop everything started, in reverse order; publish what is open."""
        if self.bus is not None:
            await self.bus.stop_subscriber()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for r in reversed(self._runners):
            await r.cleanup()
        self._runners.clear()
        await self.plane.stop()
        if self.bus is not None:
            await self.bus.stop()

    async def run_forever(self, stop: threading.Event) -> None:
        """Start, run until ``stop`` is set (or the data plane dies), stop."""
        await self.start()
        try:
            while not stop.is_set():
                await asyncio.sleep(0.2)
                self.plane.check()
        finally:
            await self.stop()

    # ----------------------------------------------------------------- scores

    def deliver(self, batch: Batch) -> None:
        """Called from the subscriber thread: apply ``batch`` on the event loop."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.apply_batch, batch)

    def apply_batch(self, batch: Batch) -> list[WeightChange]:
        """Apply LoadScore / Anomaly records now (on the loop)."""
        t = now_ms()
        scores = [r for name, r in batch if name == "LoadScore"]
        anomalies = [r for name, r in batch if name == "Anomaly"]
        changes = self.table.apply_scores(scores, t) if scores else []
        if anomalies:
            changes += self.table.apply_anomalies(anomalies, t)
        for c in changes:
            self._changed(c, t)
        if self.director is not None:
            self.director.apply_scores(scores, t)
            statuses = [r for name, r in batch if name == "MirrorStatus"]
            refused = self.director.refused_hosts
            if statuses and self.director.apply_statuses(statuses, t):
                log.info("edge mirrors now: %s", {f"{a}/{r}": sorted(u) for (a, r), u
                                                  in self.director.mirrors.items()})
            if self.director.refused_hosts > refused:  # one line per batch, never per record
                m.MIRRORS_REFUSED.labels(self.id).inc(self.director.refused_hosts - refused)
                log.warning("ignored %d READY mirror-status record(s) naming a host outside "
                            "mirror_hosts (%d so far)", self.director.refused_hosts - refused,
                            self.director.refused_hosts)
        for api in {r["api"] for r in scores if r.get("api") in self.router.routes}:
            self._set_capacity(api, t)
        return changes

    def _set_capacity(self, api: str, t: int) -> None:
        self.router.set_capacity(self.router.routes[api], self.table.total_capacity(api, t))

    def set_manual_scores(self, api: str, scores: dict[str, float], valid_s: float) -> list[
            WeightChange]:
        """Admin override: scores for ``api``'s endpoints, valid for ``valid_s`` seconds."""
        t = now_ms()
        recs = [{"endpoint_id": e, "api": api, "score": v, "computed_at": t,
                 "valid_until": t + int(valid_s * 1000), "predicted_utilization": 0.0}
                for e, v in scores.items()]
        return self.apply_batch([("LoadScore", r) for r in recs])

    def policies_changed(self) -> None:
        """Policy or dynamic routing changed (admin): update the policy gauges."""
        for api in self.router.routes:
            self._set_policy_gauge(api)

    def _set_policy_gauge(self, api: str) -> None:
        route = self.router.routes[api]
        name = route.active_policy(self.settings.dynamic_routing).name
        old = self._policy_gauge.get(api)
        if old == name:
            return
        if old is not None:
            m.POLICY.labels(self.id, api, old).set(0)
        m.POLICY.labels(self.id, api, name).set(1)
        self._policy_gauge[api] = name

    def _changed(self, c: WeightChange, t: int) -> None:
        route = self.router.routes[c.api]
        became_stale = c.stale and not route.stale
        route.stale = c.stale
        for e in route.endpoints:
            e.weight = c.weights.get(e.id, 1.0)
            m.WEIGHT.labels(self.id, c.api, e.id).set(e.weight)
        m.STALE.labels(self.id, c.api).set(1 if c.stale else 0)
        m.WEIGHT_CHANGES.labels(self.id, c.api).inc()
        if became_stale:
            m.FALLBACKS.labels(self.id, c.api).inc()
            log.warning("scores of %s are stale: %s routes", c.api,
                        route.active_policy(True).name)
        self._set_policy_gauge(c.api)
        self.weight_changes += 1
        self.last_change_ms[c.api] = t
        self.plane.apply(c)
        self._publish({
            "api": c.api, "kind": "WEIGHTS",
            "policy": route.active_policy(self.settings.dynamic_routing).name,
            "stale": c.stale, "weights": c.weights, "previous_weights": c.previous_weights,
            "scores": c.scores,
        }, t)

    def _publish(self, fields: dict[str, Any], t: int) -> None:
        if self.bus is not None:
            self.bus.publish({"sidecar_id": self.id, "region": self.settings.region, "at": t,
                              **fields})

    async def _stale_loop(self) -> None:
        while True:
            await asyncio.sleep(STALE_TICK_S)
            t = now_ms()
            for c in self.table.stale_changes(t):
                self._changed(c, t)
            if self.director is not None:
                self.director.tick(t)
            for api, route in self.router.routes.items():
                self._set_capacity(api, t)
                m.SHED.labels(self.id, api).set(route.shed_share)

    # ----------------------------------------------------------------- telemetry

    def _observe(self, o: Outcome) -> None:
        ep = o.endpoint
        if ep is None:
            return
        agent = self.bus.agent if self.bus is not None else None
        if agent is not None:
            try:
                agent.record(ep.id, o.latency_ms, o.status, api=o.route.api,
                                  connect_failure=o.connect_failure)
            except TelemetryInputError as e:
                log.debug("telemetry rejected: %s", e)
        rate = self.settings.decision_sample_rate
        if rate > 0 and self.bus is not None and self.bus.producer is not None \
                and self.rng.random() < rate:
            self._publish({
                "api": o.route.api, "kind": "REQUEST",
                "policy": o.route.active_policy(o.dynamic).name, "stale": o.route.stale,
                "weights": {e.id: e.weight for e in o.route.endpoints},
                "endpoint_id": ep.id, "status": o.status, "latency_ms": o.latency_ms,
                "attempts": o.attempts, "dynamic_routing": o.dynamic,
            }, now_ms())

    # ----------------------------------------------------------------- views

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` answers."""
        return health_view(self)

    def weights_view(self) -> dict[str, Any]:
        """What ``GET /weights`` answers."""
        return weights_view(self)
