"""What feeds each policy: the real predictive pipeline, the oracle, static weights.

Predictive (:class:`PredictiveControl`) runs the project's own code on the simulated
clock, nothing re-implemented:

- responses go into ``streams.edge.agent.TelemetryAggregator`` (the edge agent's windows);
- every ``interval_s`` the closed windows reach the processor after ``telemetry_lag_s``,
  where one ``processors.endpoint.EndpointModel`` per endpoint (``Stepper`` ->
  ``make_forecaster("default")`` -> ``CapacityEstimator`` / anomaly detector ->
  ``load_score_record``) turns them into LoadScore dicts;
- published scores reach the sidecar after ``score_lag_s``: ``WeightTable.apply_scores``
  gives the weights (capacity x health, rate-limited; ``streams/sidecar/weights.py``), which
  the data plane applies ``actuation_s`` later; the router's shedding on the API's
  predicted demand over its total capacity and its fall-back to peak-EWMA on stale scores
  are the sidecar's own.

Before the run the processor has seen ``history`` (earlier seasons of the same load shape)
as telemetry windows, split over the endpoints by configured capacity: a processor that
has been running for a while, not one that starts cold when the spike hits.

The oracle knows the true effective capacity of every backend (slowdowns included) and the
true future load, and applies them with no delay: weighted power-of-two-choices on those
weights, shedding only what exceeds the true capacity. The limit of what routing can do.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.routing_sim.engine import T0, Simulation
from processors.endpoint import EndpointModel, ProcessorConfig
from streams.edge.agent import TelemetryAggregator
from streams.sidecar.policies import Endpoint
from streams.sidecar.weights import WeightChange, WeightTable


class SmoothWeighted:
    """Static weighted round-robin (nginx's smooth variant; HAProxy's static ``roundrobin``
    with weights behaves the same): each endpoint gets exactly its weight's share, spread
    evenly, whatever happens to it.

    >>> eps = [Endpoint("a", "http://127.0.0.1:1", weight=2.0),
    ...        Endpoint("b", "http://127.0.0.1:2", weight=1.0)]
    >>> p = SmoothWeighted()
    >>> "".join(p.pick(eps, 0.0).id for _ in range(6))
    'abaaba'
    """

    name = "static-weighted"

    def __init__(self) -> None:
        self._cur: dict[str, float] = {}

    def pick(self, candidates: Sequence[Endpoint], now: float) -> Endpoint:
        cur = self._cur
        total = 0.0
        best = candidates[0]
        best_v = -math.inf
        for e in candidates:
            v = cur.get(e.id, 0.0) + e.weight
            cur[e.id] = v
            total += e.weight
            if v > best_v:
                best, best_v = e, v
        cur[best.id] = best_v - total
        return best


class StaticWeightsControl:
    """Weights fixed to the configured capacities for the whole run."""

    def __init__(self, capacities: Mapping[str, float]) -> None:
        self.capacities = dict(capacities)

    def start(self, sim: Simulation) -> None:
        sim.set_weights(self.capacities, 0.0)

    def on_response(self, backend: int, rtt_ms: float, status: int, t: float,
                    timed_out: bool) -> None:
        return None


class OracleControl:
    """True effective capacities as weights, updated at once; true future load for
    shedding (``lookahead_s`` ahead)."""

    def __init__(self, lookahead_s: float = 2.0) -> None:
        self.lookahead_s = lookahead_s

    def start(self, sim: Simulation) -> None:
        self.sim = sim
        sim.route.stale = False
        times = {0.0}
        for s in sim.cfg.slowdowns:
            times.update((s.start, s.end))
        end = sim.cfg.load.duration_s
        times.update(float(k) for k in range(int(end) + 1))
        for t in sorted(times):
            if t <= end:
                sim.schedule(t, self._update)

    def _update(self, t: float) -> None:
        sim = self.sim
        caps = {b.spec.id: b.effective_capacity(t) for b in sim.backends}
        if any(math.isinf(c) for c in caps.values()):
            return
        if not sim.weights_log or sim.weights_log[-1][1] != caps:
            sim.set_weights(caps, t)
        load = sim.cfg.load
        peak = max(load.rate_at(t + dt) for dt in np.arange(0.0, self.lookahead_s, load.bin_s))
        sim.route.overload = peak / max(sum(caps.values()), 1e-9)

    def on_response(self, backend: int, rtt_ms: float, status: int, t: float,
                    timed_out: bool) -> None:
        return None


@dataclass
class PredictiveConfig:
    """Timing and model settings of the predictive pipeline (see the module docstring)."""

    interval_s: float = 5.0
    step_s: int = 10
    horizon: int = 6
    lateness_s: float = 5.0
    season_s: int = 600
    telemetry_lag_s: float = 0.5
    score_lag_s: float = 0.5
    actuation_s: float = 0.05
    stale_check_s: float = 1.0
    capacities: dict[str, float] = field(default_factory=dict)  # configured, rps
    service_p: tuple[float, float, float] = (0.1, 0.15, 0.2)  # nominal p50/p95/p99, s
    bin_s: float = 0.1
    forecaster: str = "default"  # "persistence": the ablation (what the forecast adds)
    # Variants (not the sidecar's behaviour; for "what else was tried"):
    capacity_weighted: bool = False  # weight = score x configured capacity
    shed: bool = True  # the router's predicted-overload shedding


class PredictiveControl:
    """The real agent -> processor -> sidecar loop on the simulated clock."""

    def __init__(self, cfg: PredictiveConfig, history: np.ndarray) -> None:
        self.cfg = cfg
        self.history = history
        self.scores_published = 0
        self.windows = 0
        self.weight_changes = 0
        self.anomalies = 0
        self.stale_seconds = 0.0
        self._pos = 0

    def start(self, sim: Simulation) -> None:
        cfg = self.cfg
        self.sim = sim
        api = sim.cfg.api
        self.ids = [b.spec.id for b in sim.backends]
        self.agg = TelemetryAggregator(
            "sim-agent", "central", interval_seconds=cfg.interval_s,
            endpoint_apis=dict.fromkeys(self.ids, api), idle_windows=10**6,
        )
        pcfg = ProcessorConfig(
            forecaster=cfg.forecaster, step_seconds=cfg.step_s, season_seconds=cfg.season_s,
            horizon=cfg.horizon, lateness_seconds=cfg.lateness_s,
            capacity_rps=dict(cfg.capacities),
        )
        self.models = {i: EndpointModel.create(i, pcfg) for i in self.ids}
        self._observe_kw = _position_kw()
        # as the sidecar app builds it: upstream capacity hints, the score interval
        self.table = WeightTable(
            {api: self.ids}, capacities={e.id: e.capacity_rps for e in sim.endpoints},
            step_ms=round(cfg.interval_s * 1000),
        )
        last = self._prefeed()
        if last:  # the processor was running before t = 0: its latest scores are in
            for c in self.table.apply_scores(last, round(T0 * 1000)):
                self._apply(c, 0.0)
            self._set_overload(round(T0 * 1000))
        self.end = sim.cfg.load.duration_s + 2 * cfg.interval_s
        sim.schedule(cfg.interval_s, self._tick)
        sim.schedule(cfg.stale_check_s, self._stale_tick)

    # -- history ----------------------------------------------------------------------

    def _prefeed(self) -> list[dict[str, Any]]:
        """Feed the history as telemetry windows; return each endpoint's last score."""
        cfg = self.cfg
        per = max(1, round(cfg.interval_s / cfg.bin_s))
        n = self.history.size // per
        if n == 0:
            return []
        total = sum(cfg.capacities.values())
        shares = {i: cfg.capacities[i] / total for i in self.ids}
        rates = self.history[-n * per:].reshape(n, per).mean(axis=1)
        p50, p95, p99 = (x * 1000.0 for x in cfg.service_p)
        last: dict[str, dict[str, Any]] = {}
        for k, r in enumerate(rates):
            end_s = T0 - (n - k - 1) * cfg.interval_s
            start_ms, end_ms = round((end_s - cfg.interval_s) * 1000), round(end_s * 1000)
            for i in self.ids:
                w = _window(i, self.sim.cfg.api, start_ms, end_ms,
                            round(r * shares[i] * cfg.interval_s), p50, p95, p99)
                obs = self._observe(i, w, end_s + cfg.telemetry_lag_s)
                if obs.publish and obs.score is not None:
                    last[i] = obs.score
        return list(last.values())

    # -- the loop ---------------------------------------------------------------------

    def _observe(self, endpoint: str, window: dict[str, Any], now: float) -> Any:
        self._pos += 1
        pos: Any = (self._pos, 0) if self._observe_kw == "position" else self._pos
        return self.models[endpoint].observe(window, **{self._observe_kw: pos}, now=now)

    def _tick(self, t: float) -> None:
        windows = self.agg.close_due(T0 + t)
        if windows:
            self.sim.schedule(t + self.cfg.telemetry_lag_s, lambda tt: self._process(windows, tt))
        if t + self.cfg.interval_s <= self.end:
            self.sim.schedule(t + self.cfg.interval_s, self._tick)

    def _process(self, windows: list[dict[str, Any]], t: float) -> None:
        scores: list[dict[str, Any]] = []
        anomalies: list[dict[str, Any]] = []
        for w in windows:
            self.windows += 1
            obs = self._observe(w["endpoint_id"], w, T0 + t)
            if obs.publish and obs.score is not None:
                scores.append(obs.score)
            if obs.anomaly is not None:
                anomalies.append(obs.anomaly)
        self.scores_published += len(scores)
        self.anomalies += len(anomalies)
        if scores or anomalies:
            self.sim.schedule(t + self.cfg.score_lag_s,
                              lambda tt: self._deliver(scores, anomalies, tt))

    def _deliver(self, scores: list[dict[str, Any]], anomalies: list[dict[str, Any]],
                 t: float) -> None:
        now_ms = round((T0 + t) * 1000)
        changes = self.table.apply_scores(scores, now_ms) if scores else []
        if anomalies:
            changes += self.table.apply_anomalies(anomalies, now_ms)
        self._set_overload(now_ms)
        self._actuate(changes, t)

    def _set_overload(self, now_ms: int) -> None:
        if self.cfg.shed:
            self.sim.route.overload = self.table.overload(self.sim.cfg.api, now_ms)

    def _stale_tick(self, t: float) -> None:
        now_ms = round((T0 + t) * 1000)
        changes = self.table.stale_changes(now_ms)
        self._set_overload(now_ms)
        self._actuate(changes, t)
        if self.sim.route.stale:
            self.stale_seconds += self.cfg.stale_check_s
        if t + self.cfg.stale_check_s <= self.end:
            self.sim.schedule(t + self.cfg.stale_check_s, self._stale_tick)

    def _actuate(self, changes: list[WeightChange], t: float) -> None:
        for c in changes:
            self.sim.schedule(t + self.cfg.actuation_s, functools.partial(self._apply, c))

    def _apply(self, c: WeightChange, t: float) -> None:
        # What the sidecar app does with a WeightChange (streams/sidecar/app.py _changed).
        self.sim.route.stale = c.stale
        weights = c.weights
        if self.cfg.capacity_weighted and not c.stale:
            caps = self.cfg.capacities
            raw = {e: w * caps.get(e, 1.0) for e, w in weights.items()}
            top = max(raw.values(), default=0.0)
            weights = {e: v / top for e, v in raw.items()} if top > 0 else weights
        self.sim.set_weights(weights, t)
        self.weight_changes += 1

    def on_response(self, backend: int, rtt_ms: float, status: int, t: float,
                    timed_out: bool) -> None:
        self.agg.record(self.ids[backend], rtt_ms, status, at=T0 + t, timed_out=timed_out)

    def summary(self) -> dict[str, Any]:
        return {"windows": self.windows, "scores_published": self.scores_published,
                "weight_changes": self.weight_changes, "anomalies": self.anomalies,
                "stale_seconds": self.stale_seconds}


def _window(endpoint: str, api: str, start_ms: int, end_ms: int, count: int, p50: float,
            p95: float, p99: float) -> dict[str, Any]:
    """An EndpointTelemetry dict for the history (what the agent would have sent)."""
    return {
        "endpoint_id": endpoint, "region": "central", "api": api, "agent_id": "sim-agent",
        "window_start": start_ms, "window_end": end_ms, "interval_ms": end_ms - start_ms,
        "request_count": count, "errors_4xx": 0, "errors_5xx": 0, "errors_connect": 0,
        "latency_p50_ms": p50, "latency_p95_ms": p95, "latency_p99_ms": p99,
        "latency_max_ms": p99 * 1.5, "in_flight": 0, "errors_timeout": 0,
        "distinct_clients": None, "attributes": {}, "cpu_percent": 0.0,
        "memory_percent": 0.0, "net_in_bytes": 0, "net_out_bytes": 0,
    }


def _position_kw() -> str:
    """``EndpointModel.observe`` takes ``position=(offset, index)`` (older: ``offset``)."""
    params = inspect.signature(EndpointModel.observe).parameters
    return "position" if "position" in params else "offset"
