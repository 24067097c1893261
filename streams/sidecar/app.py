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
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from schemas.codec import Codec
from streams.edge.agent import EdgeAgent, TelemetryInputError, build_agent
from streams.kafka.producer import RecordProducer
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from streams.sidecar import metrics as m
from streams.sidecar.config import SidecarSettings, Upstream, UpstreamConfigError
from streams.sidecar.director import MirrorDirector
from streams.sidecar.haproxy import HAProxyProcess, RuntimeAPI, backend_name, render_config
from streams.sidecar.proxy import Outcome, Proxy, serve
from streams.sidecar.router import Router
from streams.sidecar.scores import Batch, ScoreSubscriber
from streams.sidecar.weights import WeightChange, WeightTable

log = logging.getLogger(__name__)

STALE_TICK_S = 0.05  # how often validity times are checked
HAPROXY_FALLBACK_S = 1.0  # stale scores: peak-EWMA-like weights from HAProxy stats this often
HAPROXY_TELEMETRY_S = 1.0
# HAProxy per-server counters -> a representative status for the edge agent (0 = connect)
STATUS_COLUMNS = {"hrsp_1xx": 100, "hrsp_2xx": 200, "hrsp_3xx": 300, "hrsp_4xx": 400,
                  "hrsp_5xx": 500, "econ": 0}


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
        self.codec = codec or Codec.for_registry(kafka.schema_registry_url if kafka else None)
        self.rng = rng or random.Random()
        self.router = Router(
            self.upstreams,
            policy=s.policy,
            fallback_policy=s.fallback_policy,
            eject_after_failures=s.eject_after_failures,
            eject_seconds=s.eject_seconds,
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
        self.director: MirrorDirector | None = None
        if s.director and s.data_plane == "proxy" and kafka is not None:
            self.director = MirrorDirector(
                region=s.region, central_region=s.central_region,
                central_capacity_rps=s.central_capacity_rps, lookahead_s=s.mirror_lookahead_s,
                headroom=s.mirror_headroom, rng=self.rng, mirror_hosts=s.mirror_hosts,
            )
        self.proxy: Proxy | None = None
        if s.data_plane == "proxy":
            self.proxy = Proxy(
                self.router,
                sidecar_id=self.id,
                dynamic_routing=s.dynamic_routing,
                connect_timeout_s=s.connect_timeout_s,
                request_timeout_s=s.request_timeout_s,
                pool_size=s.pool_size,
                max_attempts=s.max_attempts,
                retry_after_s=s.retry_after_s,
                compress_responses=s.compress_responses,
                observe=self._observe,
                director=self.director,
                region=s.region,
            )
        self.haproxy: HAProxyProcess | None = None
        self.runtime: RuntimeAPI | None = None
        self.producer: RecordProducer | None = None
        self.agent: EdgeAgent | None = None
        self.subscriber: ScoreSubscriber | None = None
        self.decisions_topic = topic_name(kafka, "routing-decisions") if kafka else ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self.admin_port = 0
        self.started_at = 0.0
        self.weight_changes = 0
        self.last_change_ms: dict[str, int] = {}
        self.haproxy_errors = 0
        self._runners: list[web.BaseRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: dict[str, dict[str, int]] = {}
        self._push = asyncio.Event()
        self._agent_stop = threading.Event()
        self._agent_thread: threading.Thread | None = None
        self._policy_gauge: dict[str, str] = {}
        for api in self.router.routes:
            self._set_policy_gauge(api)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the data plane, the admin server, and the Kafka parts."""
        from streams.sidecar.admin import admin_app

        s = self.settings
        self.loop = asyncio.get_running_loop()
        self._push = asyncio.Event()
        self.started_at = time.time()
        if self.kafka is not None:
            self.producer = RecordProducer(self.kafka, f"sidecar-{self.id}", max_buffered=50_000)
            self.agent = build_agent(
                self.kafka, self.codec, agent_id=self.id, region=s.region,
                interval_seconds=s.telemetry_interval_s,
                endpoint_apis={u.id: u.api for u in self.upstreams},
            )
            self._agent_thread = threading.Thread(
                target=self.agent.run, args=(self._agent_stop,), name="sidecar-agent",
                daemon=True,
            )
            self._agent_thread.start()
        if self.proxy is not None:
            await self.proxy.open()
            runner, self.port = await serve(self.proxy.server(), s.listen_host, s.listen_port)
            self._runners.append(runner)
        else:
            await self._start_haproxy()
        runner, self.admin_port = await serve(admin_app(self), s.listen_host, s.admin_port)
        self._runners.append(runner)
        self._tasks.append(asyncio.create_task(self._stale_loop(), name="sidecar-stale"))
        if self.kafka is not None:
            self.subscriber = ScoreSubscriber(
                self.kafka, self.codec, self.deliver, sidecar_id=self.id,
                dead_letter=self.producer, lookback_s=s.score_lookback_s,
                mirror_status_lookback_s=s.mirror_lookback_s if self.director else None,
            )
            await asyncio.to_thread(self.subscriber.start)
            self._tasks.append(asyncio.create_task(self._supervise_loop(),
                                                   name="sidecar-supervise"))
        log.info("sidecar %s: %s on %s:%d, admin on :%d", self.id, s.data_plane,
                 s.listen_host, self.port, self.admin_port)

    async def _start_haproxy(self) -> None:
        s = self.settings
        if s.haproxy_socket is not None:  # attach to a running HAProxy
            self.runtime = RuntimeAPI(s.haproxy_socket)
            stats = await self.runtime.stats()
            have = {(r["pxname"], r["svname"]) for r in stats}
            missing = [f"{backend_name(u.api)}/{u.id}" for u in self.upstreams
                       if (backend_name(u.api), u.id) not in have]
            if missing:
                raise UpstreamConfigError(
                    f"sidecar.haproxy_socket: HAProxy has no server {', '.join(missing)}"
                )
            self.port = s.listen_port
        else:
            from streams.kafka.broker import free_port

            self.port = s.listen_port or free_port(s.listen_host)
            proc = HAProxyProcess("", binary=s.haproxy_bin)
            sock = proc.dir / "admin.sock"
            proc.config_path.write_text(render_config(
                self.upstreams, bind=f"{s.listen_host}:{self.port}", socket_path=sock,
                threads=s.haproxy_threads, connect_timeout_s=s.connect_timeout_s,
                request_timeout_s=s.request_timeout_s,
                eject_after_failures=s.eject_after_failures,
            ))
            await asyncio.to_thread(proc.start, sock)
            self.haproxy = proc
            self.runtime = RuntimeAPI(sock)
        self._tasks.append(asyncio.create_task(self._push_loop(), name="sidecar-haproxy"))
        self._tasks.append(asyncio.create_task(self._haproxy_fallback_loop(),
                                               name="sidecar-haproxy-fallback"))
        if self.agent is not None:
            self._tasks.append(asyncio.create_task(self._haproxy_telemetry_loop(),
                                                   name="sidecar-haproxy-telemetry"))

    async def stop(self) -> None:
        """Stop everything started, in reverse order; publish what is open."""
        if self.subscriber is not None:
            await asyncio.to_thread(self.subscriber.stop)
            self.subscriber = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        for r in reversed(self._runners):
            await r.cleanup()
        self._runners.clear()
        if self.proxy is not None:
            await self.proxy.close()
        if self.haproxy is not None:
            await asyncio.to_thread(self.haproxy.stop)
            self.haproxy = None
        if self._agent_thread is not None:
            self._agent_stop.set()
            await asyncio.to_thread(self._agent_thread.join, 30)
            self._agent_thread = None
        if self.producer is not None:
            await asyncio.to_thread(self.producer.flush, 10)
        # drop the Kafka clients now rather than at garbage collection
        self.producer = None
        self.agent = None

    async def run_forever(self, stop: threading.Event) -> None:
        """Start, run until ``stop`` is set (or HAProxy dies), stop."""
        await self.start()
        try:
            while not stop.is_set():
                await asyncio.sleep(0.2)
                if self.haproxy is not None and not self.haproxy.alive():
                    raise RuntimeError(f"haproxy exited: {self.haproxy.log_tail()}")
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
        """The route sheds by offered rate over this capacity; None (no configured or
        confidently learned capacity for every live endpoint): never sheds."""
        route = self.router.routes[api]
        route.capacity_rps = self.table.total_capacity(api, t)
        if route.capacity_rps is None:
            route.overload = 0.0
            route.shed_share = 0.0
        else:
            self.router.update_overload(route)

    def set_manual_scores(self, api: str, scores: dict[str, float], valid_s: float) -> list[
            WeightChange]:
        """Admin override: scores for ``api``'s endpoints, valid for ``valid_s`` seconds."""
        t = now_ms()
        recs = [{"endpoint_id": e, "api": api, "score": v, "computed_at": t,
                 "valid_until": t + int(valid_s * 1000), "predicted_utilization": 0.0}
                for e, v in scores.items()]
        return self.apply_batch([("LoadScore", r) for r in recs])

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
        if self.runtime is not None:
            self._pending[c.api] = dict(c.haproxy)
            self._push.set()
        self._publish({
            "api": c.api, "kind": "WEIGHTS",
            "policy": route.active_policy(self.settings.dynamic_routing).name,
            "stale": c.stale, "weights": c.weights, "previous_weights": c.previous_weights,
            "scores": c.scores,
        }, t)

    def _publish(self, fields: dict[str, Any], t: int) -> None:
        if self.producer is None:
            return
        rec = {"sidecar_id": self.id, "region": self.settings.region, "at": t, **fields}
        try:
            value = self.codec.encode("RoutingDecision", rec)
        except ValueError as e:  # a bug, but routing must go on
            log.error("routing decision did not encode: %s", e)
            return
        self.producer.produce(self.decisions_topic, value, self.id.encode())
        self.producer.poll(0)

    async def _supervise_loop(self) -> None:
        """Restart the score reader thread if it died (``/health`` is 503 meanwhile)."""
        while True:
            await asyncio.sleep(1.0)
            sub = self.subscriber
            if sub is not None:
                sub.supervise()

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

    # ----------------------------------------------------------------- HAProxy

    async def _push_loop(self) -> None:
        assert self.runtime is not None
        while True:
            await self._push.wait()
            self._push.clear()
            pending, self._pending = self._pending, {}
            if not pending:
                continue
            try:
                await self.runtime.set_weights(pending)
                m.HAPROXY_UPDATES.labels(self.id, "ok").inc()
            except (OSError, TimeoutError, RuntimeError) as e:
                self.haproxy_errors += 1
                m.HAPROXY_UPDATES.labels(self.id, "error").inc()
                log.error("pushing weights to HAProxy failed: %s", e)
                for api, ws in pending.items():  # keep them for the next push
                    self._pending.setdefault(api, ws)
                await asyncio.sleep(0.5)
                self._push.set()

    async def _haproxy_fallback_loop(self) -> None:
        """With stale scores HAProxy still balances by weight: set weights from its own
        per-server response time and queue (cost = rtime × (current + 1), as peak-EWMA)."""
        assert self.runtime is not None
        while True:
            await asyncio.sleep(HAPROXY_FALLBACK_S)
            stale = [api for api, r in self.router.routes.items() if r.stale]
            if not stale:
                continue
            try:
                stats = await self.runtime.stats()
            except (OSError, TimeoutError) as e:
                log.warning("reading HAProxy stats failed: %s", e)
                continue
            for api in stale:
                costs = fallback_costs(stats, api)
                if costs:
                    self._pending[api] = cost_weights(costs)
                    self._push.set()

    async def _haproxy_telemetry_loop(self) -> None:
        """HAProxy routes the requests: feed the edge agent from its per-server counters
        (deltas of responses by status class and connection errors each second, latency
        = HAProxy's mean response time of the server)."""
        assert self.runtime is not None and self.agent is not None
        agent = self.agent
        last: dict[tuple[str, str], dict[str, int]] = {}
        while True:
            await asyncio.sleep(HAPROXY_TELEMETRY_S)
            try:
                stats = await self.runtime.stats()
            except (OSError, TimeoutError) as e:
                log.warning("reading HAProxy stats failed: %s", e)
                continue
            for row in stats:
                api = row.get("pxname", "")[3:]
                ep = row.get("svname", "")
                if not row.get("pxname", "").startswith("be_") or api not in self.router.routes \
                        or ep not in self.router.endpoints:
                    continue  # the "_first" twins and FRONTEND/BACKEND rows
                now = {k: int(row.get(k) or 0) for k in STATUS_COLUMNS}
                prev = last.get((api, ep))
                last[(api, ep)] = now
                if prev is None:
                    if self.haproxy is None:
                        continue  # attached: counters from before us are not ours
                    prev = dict.fromkeys(STATUS_COLUMNS, 0)  # our own HAProxy: from 0
                rtime = float(row.get("rtime") or 0)
                for col, status in STATUS_COLUMNS.items():
                    n = max(0, now[col] - prev[col])
                    if n:  # one weighted call per status class, not one per request
                        agent.record(ep, rtime, status, api=api, connect_failure=status == 0,
                                     count=n)

    # ----------------------------------------------------------------- telemetry

    def _observe(self, o: Outcome) -> None:
        ep = o.endpoint
        if ep is None:
            return
        if self.agent is not None:
            try:
                self.agent.record(ep.id, o.latency_ms, o.status, api=o.route.api,
                                  connect_failure=o.connect_failure)
            except TelemetryInputError as e:
                log.debug("telemetry rejected: %s", e)
        rate = self.settings.decision_sample_rate
        if rate > 0 and self.producer is not None and self.rng.random() < rate:
            self._publish({
                "api": o.route.api, "kind": "REQUEST",
                "policy": o.route.active_policy(o.dynamic).name, "stale": o.route.stale,
                "weights": {e.id: e.weight for e in o.route.endpoints},
                "endpoint_id": ep.id, "status": o.status, "latency_ms": o.latency_ms,
                "attempts": o.attempts, "dynamic_routing": o.dynamic,
            }, now_ms())

    # ----------------------------------------------------------------- views

    def health(self) -> dict[str, Any]:
        t = time.monotonic()
        apis = {}
        for api, r in self.router.routes.items():
            apis[api] = {
                "stale": r.stale,
                "policy": r.active_policy(self.settings.dynamic_routing).name,
                "available": sum(1 for e in r.endpoints if e.available(t)),
                "endpoints": len(r.endpoints),
            }
        ok = self.haproxy is None or self.haproxy.alive()
        reader = self.subscriber is None or self.subscriber.alive()
        return {
            "status": "data plane down" if not ok else "ok" if reader else "score reader down",
            "sidecar_id": self.id,
            "data_plane": self.settings.data_plane,
            "port": self.port,
            "dynamic_routing": self.settings.dynamic_routing,
            "apis": apis,
            "scores_received": self.subscriber.received if self.subscriber else 0,
            "scores_skipped": self.subscriber.skipped if self.subscriber else 0,
            "score_reader_restarts": self.subscriber.crashes if self.subscriber else 0,
            "mirrors": self.director.view() if self.director is not None else {},
        }

    def weights_view(self) -> dict[str, Any]:
        t = time.monotonic()
        view = self.table.snapshot(now_ms())
        for api, r in self.router.routes.items():
            view[api]["policy"] = r.active_policy(self.settings.dynamic_routing).name
            view[api]["offered_rps"] = round(r.offered_rps(t, self.router.rate_window_s), 3)
            view[api]["overload"] = round(self.router.update_overload(r, t), 4)
            view[api]["shed_share"] = round(r.shed_share, 4)
            view[api]["shed"] = r.shed_total
            view[api]["endpoints"] = {
                e.id: {"url": e.url, "weight": e.weight, "in_flight": e.in_flight,
                       "ejected": not e.available(t), "requests": e.requests,
                       "failures": e.failures, "peak_ewma_ms": round(e.rtt_ms, 3)}
                for e in r.endpoints
            }
        return view


def fallback_costs(stats: Sequence[dict[str, str]], api: str) -> dict[str, float]:
    """Per-server cost from ``show stat``: mean response time (ms, last 1024 requests) ×
    (current sessions + 1); servers that are down are left out."""
    out = {}
    for row in stats:
        if row.get("pxname") != backend_name(api) or row.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        if not str(row.get("status", "")).startswith("UP"):
            continue
        rtime = float(row.get("rtime") or 0) or 1.0
        out[row["svname"]] = rtime * (int(row.get("scur") or 0) + 1)
    return out


def cost_weights(costs: dict[str, float]) -> dict[str, int]:
    """HAProxy weights inversely proportional to cost (cheapest = 256, never 0).

    >>> cost_weights({"a": 1.0, "b": 4.0})
    {'a': 256, 'b': 64}
    """
    best = min(costs.values())
    return {k: max(1, min(256, round(256 * best / v))) for k, v in costs.items()}

