"""The router: per API, which endpoint gets a request, in which order to fall back, and
whether to shed it. Plain Python (no I/O): the proxy and the tests drive it.

>>> from streams.sidecar.config import Upstream
>>> r = Router([Upstream(id="a", url="http://127.0.0.1:9001"),
...             Upstream(id="b", url="http://127.0.0.1:9002")], policy="round-robin")
>>> route = r.route_for(None, "/x")
>>> [r.choose(route, dynamic=False, now=0.0).id for _ in range(3)]
['a', 'a', 'a']
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from streams.sidecar.config import Upstream
from streams.sidecar.policies import (
    Endpoint,
    FirstAvailable,
    Policy,
    fallback_order,
    make_policy,
    shed_plan,
)

DEFAULT_PRIORITY = 5  # X-Loadcast-Priority 0 (shed first) .. 9 (shed last)


@dataclass
class Route:
    """One API: its endpoints (configuration order) and routing state."""

    api: str
    endpoints: list[Endpoint]
    policy: Policy
    fallback: Policy
    stale: bool = True  # no fresh scores yet: the fallback policy routes
    # demand over capacity: offered rate / capacity_rps when the capacity is known (the
    # sidecar sets capacity_rps from configured or confidently learned capacities);
    # without it, whatever the owner sets (the routing simulation: predicted demand)
    overload: float = 0.0
    capacity_rps: float | None = None
    priority_counts: dict[int, float] = field(default_factory=dict)
    seen: int = 0
    shed_share: float = 0.0
    # offered requests (shed ones included) in the current and the previous rate window
    window_start: float = 0.0
    window_count: int = 0
    previous_count: int = 0
    offered_total: int = 0
    shed_total: int = 0

    def count_offered(self, now: float, window_s: float) -> None:
        self._roll(now, window_s)
        self.window_count += 1
        self.offered_total += 1

    def offered_rps(self, now: float, window_s: float) -> float:
        """Requests/s offered to this API at the sidecar: a sliding window of
        ``window_s`` (the previous window weighted by how much of it still overlaps)."""
        self._roll(now, window_s)
        frac = min(1.0, max(0.0, (now - self.window_start) / window_s))
        return (self.previous_count * (1.0 - frac) + self.window_count) / window_s

    def _roll(self, now: float, window_s: float) -> None:
        if self.window_start == 0.0:
            self.window_start = now
            return
        elapsed = now - self.window_start
        if elapsed >= window_s:
            self.previous_count = self.window_count if elapsed < 2 * window_s else 0
            self.window_count = 0
            self.window_start += window_s * math.floor(elapsed / window_s)

    def active_policy(self, dynamic: bool) -> Policy:
        """The policy routing now: configured while scores are fresh (or the configured
        policy does not use scores), the fallback (peak-EWMA) when they are stale."""
        if not dynamic:
            return _FIRST
        if self.stale and self.policy.name == "predictive":
            return self.fallback
        return self.policy


_FIRST = FirstAvailable()


class Router:
    """Routing state of every API of a sidecar."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        policy: str = "predictive",
        fallback_policy: str = "peak-ewma",
        eject_after_failures: int = 5,
        eject_seconds: float = 5.0,
        max_ejected_share: float = 0.1,
        shed_overload: float = 1.0,
        rate_window_s: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        """``rate_window_s``: the window the offered rate is counted over (shedding
        follows a change of the offered rate within two windows)."""
        self.rng = rng or random.Random()
        self.rate_window_s = rate_window_s
        self.eject_after = eject_after_failures
        self.eject_s = eject_seconds
        self.max_ejected_share = max_ejected_share
        self.shed_overload = shed_overload
        self.routes: dict[str, Route] = {}
        self.endpoints: dict[str, Endpoint] = {}
        for u in upstreams:
            ep = Endpoint(u.id, u.url, u.api, u.region, u.capacity_rps)
            self.endpoints[u.id] = ep
            route = self.routes.get(u.api)
            if route is None:
                route = self.routes[u.api] = Route(
                    u.api, [], make_policy(policy, self.rng), make_policy(fallback_policy, self.rng)
                )
            route.endpoints.append(ep)
        self.default = next(iter(self.routes.values()), None)

    def set_policy(self, name: str, api: str | None = None) -> None:
        """Switch the configured policy (of one API or all)."""
        for r in self.routes.values():
            if api is None or r.api == api:
                r.policy = make_policy(name, self.rng)

    def route_for(self, api_header: str | None, path: str) -> Route | None:
        """The API of a request: the ``X-Loadcast-Api`` header, else the first path
        segment if it names an API, else the first configured API. None: unknown API
        named in the header."""
        if api_header:
            return self.routes.get(api_header)
        if len(self.routes) > 1:
            seg = path.split("/", 2)[1] if path.startswith("/") else ""
            r = self.routes.get(seg)
            if r is not None:
                return r
        return self.default

    def choose(self, route: Route, dynamic: bool, now: float) -> Endpoint | None:
        """The endpoint for a new request; None when every endpoint is ejected."""
        eps = route.endpoints
        candidates = [e for e in eps if e.ejected_until <= now]
        if not candidates:
            return None
        policy = route.active_policy(dynamic)
        if policy.name == "predictive":
            weighted = [e for e in candidates if e.weight > 0]
            if weighted:
                candidates = weighted
        return policy.pick(candidates, now)

    def next_after(self, route: Route, tried: Sequence[Endpoint], dynamic: bool,
                   now: float) -> Endpoint | None:
        """The endpoint to try after a connection failure: the next by score with dynamic
        routing on (peak-EWMA cost when scores are stale), the next available in
        configuration order with it off. None when all were tried or are ejected."""
        if dynamic:
            order = fallback_order(tried[0], route.endpoints, now, by_score=not route.stale)
        else:
            order = list(route.endpoints)
        for e in order:
            if e not in tried and e.ejected_until <= now:
                return e
        return None

    def readmit_in(self, route: Route, now: float) -> float:
        """Seconds until the first ejected endpoint is re-admitted (for Retry-After)."""
        return max(0.0, min((e.ejected_until for e in route.endpoints), default=now) - now)

    def succeeded(self, ep: Endpoint, rtt_ms: float, now: float) -> None:
        ep.requests += 1
        ep.observe_rtt(rtt_ms, now)
        ep.observe_rif_latency(rtt_ms)
        ep.succeeded()

    def failed(self, ep: Endpoint, now: float, rtt_ms: float | None = None) -> bool:
        """Count a connection failure or 5xx-class error; True if it ejected ``ep``.

        Outlier ejection is capped as Envoy's ``max_ejection_percent``: at most
        ``max_ejected_share`` of a route's endpoints are out at once (at least one). When
        every endpoint answers 503 because all are overloaded, ejecting them all would turn
        an overload into a total outage (seen in the demo: a lane answered nothing but
        503 ``no_endpoint`` for 20 s after a stall)."""
        ep.requests += 1
        if rtt_ms is not None:
            ep.observe_rtt(rtt_ms, now)
        # the cap is counted only when this failure completes a streak (rarely)
        due = ep.consecutive_failures + 1 >= self.eject_after
        return ep.failed(now, self.eject_after, self.eject_s,
                         not due or self._may_eject(ep, now))

    def _may_eject(self, ep: Endpoint, now: float) -> bool:
        route = self.routes.get(ep.api)
        if route is None or ep not in route.endpoints:
            return True
        out = sum(1 for e in route.endpoints if e.ejected_until > now)
        return out < max(1, math.floor(self.max_ejected_share * len(route.endpoints)))

    def eject(self, ep: Endpoint, now: float, seconds: float) -> None:
        ep.ejected_until = now + seconds

    def readmit(self, ep: Endpoint) -> None:
        ep.ejected_until = 0.0
        ep.consecutive_failures = 0

    # ----------------------------------------------------------------- shedding

    def set_capacity(self, route: Route, capacity_rps: float | None) -> None:
        """The route sheds by offered rate over this capacity; None (no configured or
        confidently learned capacity for every live endpoint): never sheds."""
        route.capacity_rps = capacity_rps
        if capacity_rps is None:
            route.overload = 0.0
            route.shed_share = 0.0
        else:
            self.update_overload(route)

    def update_overload(self, route: Route, now: float | None = None) -> float:
        """With a known capacity: overload = offered rate / capacity, now (also when no
        request arrives, so that the view and the metric fall back); else unchanged."""
        if route.capacity_rps is not None:
            t = time.monotonic() if now is None else now
            route.overload = route.offered_rps(t, self.rate_window_s) / route.capacity_rps
            if route.overload <= self.shed_overload:
                route.shed_share = 0.0
        return route.overload

    def should_shed(self, route: Route, priority: int, now: float | None = None) -> bool:
        """Adaptive load shedding. Every request offered to the API is counted (shed ones
        too: shedding must not hide the demand it sheds, or it would oscillate). With a
        known capacity (``route.capacity_rps``), overload = offered rate / capacity; above
        ``shed_overload`` the lowest-priority share of traffic that exceeds capacity is
        dropped instead of letting every request time out. With no known capacity,
        nothing is shed unless the owner set ``route.overload`` (the simulation does)."""
        t = time.monotonic() if now is None else now
        route.count_offered(t, self.rate_window_s)
        counts = route.priority_counts
        counts[priority] = counts.get(priority, 0.0) + 1.0
        route.seen += 1
        if route.seen >= 2000:  # decay the mix so it follows the current traffic
            route.seen = 0
            for k in counts:
                counts[k] *= 0.5
        overload = self.update_overload(route, t)
        if overload <= self.shed_overload:
            route.shed_share = 0.0
            return False
        total = sum(counts.values())
        if total < 100:  # too few requests to know the priority mix: shed nothing yet
            return False
        excess = 1.0 - self.shed_overload / overload
        route.shed_share = excess
        plan = shed_plan(excess, {k: v / total for k, v in counts.items()})
        p = plan.get(priority, 0.0)
        shed = p > 0 and self.rng.random() < p
        route.shed_total += shed
        return shed
