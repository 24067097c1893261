"""The discrete-event simulation: a client, the sidecar's router, backends (heapq, seeded).

Per request: the router (``streams.sidecar.router.Router``, the real one, on a simulated
clock) may shed it (predicted overload), else picks an endpoint; the backend serves, queues,
sheds or expires it; the response goes back through the router (``succeeded``/``failed``:
peak-EWMA RTTs, outlier ejection) and to the control loop (telemetry for the predictive
policy). Like the real proxy, the router waits for the backend's answer even after the
client's deadline has passed: the client counts the request as an error, the endpoint keeps
it in flight until it answers.

Outcomes: ``OK`` (answered within the deadline), ``TIMEOUT`` (answered after it),
``EXPIRED`` (dropped from a backend queue past its deadline: an error for the client),
``SHED_BACKEND`` (backend queue full, immediate 503), ``SHED_SIDECAR`` (the sidecar shed it
as predicted overload), ``NO_ENDPOINT`` (every endpoint ejected).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from benchmarks.routing_sim.backends import Backend, BackendSpec, Slowdown
from benchmarks.routing_sim.loadshape import LoadShape
from streams.sidecar.config import Upstream
from streams.sidecar.router import Route, Router

OK, TIMEOUT, EXPIRED, SHED_BACKEND, SHED_SIDECAR, NO_ENDPOINT = range(6)
OUTCOMES = ("ok", "timeout", "expired", "shed_backend", "shed_sidecar", "no_endpoint")
ERROR_OUTCOMES = (TIMEOUT, EXPIRED)
SHED_OUTCOMES = (SHED_BACKEND, SHED_SIDECAR, NO_ENDPOINT)

#: Simulated time 0 is this epoch second (aligned to every interval used): scores and
#: telemetry carry realistic epoch-ms timestamps, and no clock is ever 0.
T0 = 1_700_000_000.0

_ARRIVAL, _DONE, _CALL = 0, 1, 2


@dataclass
class SimConfig:
    """Everything one run needs besides the policy."""

    backends: list[BackendSpec]
    load: LoadShape
    slowdowns: list[Slowdown] = field(default_factory=list)
    arrivals: str = "poisson"
    deadline_s: float = 1.0
    seed: int = 0
    api: str = "api"
    interval_s: float = 5.0  # telemetry interval (the unit of "time to react")
    priority: int = 5


class Control(Protocol):
    """What drives a policy's inputs besides the router's own request feedback."""

    def start(self, sim: Simulation) -> None: ...

    def on_response(self, backend: int, rtt_ms: float, status: int, t: float,
                    timed_out: bool) -> None: ...


class NoControl:
    """Baselines: nothing beyond the router's per-request feedback."""

    def start(self, sim: Simulation) -> None:
        return None

    def on_response(self, backend: int, rtt_ms: float, status: int, t: float,
                    timed_out: bool) -> None:
        return None


@dataclass
class RunResult:
    """Raw outcome of one run (numpy arrays; times in sim seconds)."""

    t_arrival: np.ndarray
    rtt_ms: np.ndarray
    outcome: np.ndarray
    backend: np.ndarray  # -1 when never dispatched
    dispatched: np.ndarray  # (backends, seconds) requests sent
    busy: np.ndarray  # (backends, seconds) busy slot-seconds (0 for unlimited backends)
    capacity: np.ndarray  # (backends, seconds) effective capacity, rps
    slots: list[int | None]
    weights: list[tuple[float, dict[str, float]]]  # (t, weights) whenever they changed
    duration_s: float
    interval_s: float
    deadline_s: float
    stats: dict[str, Any]


class Simulation:
    """One seeded run of one policy."""

    def __init__(self, cfg: SimConfig, policy: str, control: Control | None = None,
                 policy_obj: Any = None) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.svc_rng = random.Random(cfg.seed * 7919 + 1)
        self.arr_rng = random.Random(cfg.seed * 104_729 + 2)
        upstreams = [
            Upstream(id=b.id, url=f"http://127.0.0.1:{9000 + i}", api=cfg.api,
                     capacity_rps=None if math.isinf(b.capacity_rps) else b.capacity_rps)
            for i, b in enumerate(cfg.backends)
        ]
        self.router = Router(upstreams, policy=policy, fallback_policy="peak-ewma",
                             rng=random.Random(cfg.seed * 31 + 3))
        self.route: Route = self.router.routes[cfg.api]
        if policy_obj is not None:
            self.route.policy = policy_obj
        self.endpoints = self.route.endpoints
        self.backends = [Backend(spec, i, [s for s in cfg.slowdowns if s.backend == i])
                         for i, spec in enumerate(cfg.backends)]
        self.control: Control = control or NoControl()
        self.now = 0.0
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.weights_log: list[tuple[float, dict[str, float]]] = []
        self.stats: dict[str, Any] = {}

    # -- scheduling -----------------------------------------------------------------------

    def schedule(self, t: float, fn: Callable[[float], None]) -> None:
        """Call ``fn(t)`` at sim time ``t``."""
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, _CALL, fn))

    def set_weights(self, weights: dict[str, float], t: float) -> None:
        """Apply routing weights to the data plane now (endpoint id -> weight)."""
        for e in self.endpoints:
            e.weight = weights.get(e.id, 1.0)
        self.weights_log.append((t, dict(weights)))

    # -- run ------------------------------------------------------------------------------

    def run(self) -> RunResult:
        cfg = self.cfg
        dur = cfg.load.duration_s
        n_sec = math.ceil(dur + 4 * cfg.deadline_s + 30)
        nb = len(self.backends)
        dispatched = np.zeros((nb, n_sec))
        busy = np.zeros((nb, n_sec))
        t_arr: list[float] = []
        rtt: list[float] = []
        outcome: list[int] = []
        where: list[int] = []
        deadline = cfg.deadline_s
        router, route, eps, backends = self.router, self.route, self.endpoints, self.backends
        ep_index = {id(e): i for i, e in enumerate(eps)}
        control = self.control
        heap = self._heap
        push, pop = heapq.heappush, heapq.heappop
        svc_rng = self.svc_rng
        prio = cfg.priority
        arrivals = cfg.load.arrivals(self.arr_rng, cfg.arrivals)

        def start_service(b: Backend, rid: int, t: float) -> None:
            b.busy += 1
            s = b.service_time(t, svc_rng)
            self._seq += 1
            push(heap, (t + s, self._seq, _DONE, rid))
            if b.spec.slots is not None:  # busy slot-seconds per second bin
                row, lo, hi = busy[b.index], t, t + s
                k = int(lo)
                while lo < hi and k < n_sec:
                    edge = k + 1.0
                    row[k] += min(hi, edge) - lo
                    lo, k = edge, k + 1

        def respond(rid: int, t: float, status: int, kind: int) -> None:
            b = where[rid]
            e = eps[b]
            e.in_flight -= 1
            ms = (t - t_arr[rid]) * 1000.0
            rtt[rid] = ms
            now = T0 + t
            if status >= 500:
                router.failed(e, now, ms)
            else:
                router.succeeded(e, ms, now)
            timed_out = kind == OK and ms > deadline * 1000.0
            outcome[rid] = TIMEOUT if timed_out else kind
            control.on_response(b, ms, status, t, timed_out)

        control.start(self)
        first = next(arrivals, None)
        if first is not None:
            self._seq += 1
            push(heap, (first, self._seq, _ARRIVAL, None))

        while heap:
            t, _, kind, x = pop(heap)
            self.now = t
            if kind == _ARRIVAL:
                nxt = next(arrivals, None)
                if nxt is not None:
                    self._seq += 1
                    push(heap, (nxt, self._seq, _ARRIVAL, None))
                rid = len(t_arr)
                t_arr.append(t)
                rtt.append(0.0)
                outcome.append(OK)
                where.append(-1)
                if route.overload > 0 and router.should_shed(route, prio):
                    outcome[rid] = SHED_SIDECAR
                    continue
                e = router.choose(route, True, T0 + t)
                if e is None:
                    outcome[rid] = NO_ENDPOINT
                    continue
                bi = ep_index[id(e)]
                where[rid] = bi
                e.in_flight += 1
                dispatched[bi, int(t)] += 1
                b = backends[bi]
                if b.has_free_slot():
                    start_service(b, rid, t)
                elif not b.queue_full():
                    b.queue.append(rid)
                else:
                    b.shed += 1
                    respond(rid, t, 503, SHED_BACKEND)
            elif kind == _DONE:
                rid = x
                b = backends[where[rid]]
                b.busy -= 1
                b.served += 1
                respond(rid, t, 200, OK)
                q = b.queue
                while q:
                    r2 = q.popleft()
                    if t - t_arr[r2] > deadline:
                        b.expired += 1
                        respond(r2, t, 503, EXPIRED)
                        continue
                    start_service(b, r2, t)
                    break
            else:
                x(t)

        cap = np.array([[b.effective_capacity(s + 0.5) for s in range(n_sec)] for b in backends])
        self.stats.update({
            "requests": len(t_arr),
            "served": [b.served for b in backends],
            "backend_shed": [b.shed for b in backends],
            "expired": [b.expired for b in backends],
        })
        return RunResult(
            t_arrival=np.asarray(t_arr), rtt_ms=np.asarray(rtt),
            outcome=np.asarray(outcome, dtype=np.int8), backend=np.asarray(where, dtype=np.int16),
            dispatched=dispatched, busy=busy, capacity=cap,
            slots=[b.spec.slots for b in backends], weights=self.weights_log,
            duration_s=dur, interval_s=cfg.interval_s, deadline_s=deadline, stats=self.stats,
        )
