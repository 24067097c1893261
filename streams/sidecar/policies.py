"""Routing policies: one interface, six policies, plus outlier ejection state.

Every policy picks one endpoint from the candidates (endpoints that are not ejected);
the router tries the others in score order after a connection failure.

- ``predictive``: forecast-driven weights x the reactive per-request signal. Weighted
  power-of-two-choices: draw two distinct endpoints with probability proportional to their
  weights (capacity x health from the scores, ``weights.py``), keep the one with the lower
  peak-EWMA cost (latency x (in-flight + 1), as ``peak-ewma``) divided by its weight (ties:
  the first draw). Each weight is first divided by how many times slower than usual its
  endpoint answers now (:meth:`Endpoint.slowdown`): a backend that slowed down since the
  last score has less capacity than its weight says. Idle, it reproduces the weights
  exactly; under load it sees a slow or backed-up endpoint as fast as ``peak-ewma`` does;
  with equal weights and no endpoint slower than usual it *is* ``peak-ewma`` (never worse
  than the reactive policy it contains).
- ``first-available``: the first candidate in configuration order (dynamic routing off).
- ``round-robin``: candidates in turn.
- ``least-request``: power-of-two-choices on in-flight requests (Envoy's least_request).
- ``peak-ewma``: Finagle/Linkerd: cost = peak-sensitive EWMA of RTT × (in-flight + 1),
  decay 10 s, power-of-two-choices.
- ``prequal``: Google's Prequal (NSDI 2024): a bounded pool of asynchronously probed
  (requests-in-flight, latency) pairs, reused across requests, and the hot-cold rule
  (see :class:`Prequal`).

>>> import random
>>> eps = [Endpoint("a", "http://127.0.0.1:1", weight=3.0), Endpoint("b", "http://127.0.0.1:2")]
>>> pol = make_policy("predictive", random.Random(1))
>>> picks = [pol.pick(eps, 0.0).id for _ in range(4000)]
>>> abs(picks.count("a") / 4000 - 0.75) < 0.03
True
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

DECAY_S = 10.0  # peak-EWMA time constant (Finagle's default)
MAX_EJECT_S = 60.0
RIF_ALPHA = 0.2  # EWMA weight of a new sample in the per-in-flight latency table
# An endpoint's recent latency (time constant SPEED_RECENT_S) against its usual one
# (SPEED_USUAL_S): how many times slower it is now, which a weight set from the last
# score does not know yet (see :meth:`Endpoint.slowdown`).
SPEED_RECENT_S = 2.0
SPEED_USUAL_S = 60.0
MAX_SLOWDOWN = 10.0


@dataclass(eq=False)
class Endpoint:
    """One upstream endpoint as the router sees it (mutable runtime state)."""

    id: str
    url: str
    api: str = "default"
    region: str = "central"
    capacity_rps: float | None = None
    weight: float = 1.0  # relative routing weight from scores (0 = drain)
    in_flight: int = 0
    # peak-EWMA state: cost estimate in ms and when it was last updated (monotonic s)
    rtt_ms: float = 0.0
    rtt_at: float = 0.0
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    requests: int = 0
    failures: int = 0
    # Prequal's latency signal: EWMA latency of successful requests per in-flight level
    rif_latency: dict[int, float] = field(default_factory=dict)
    # recent and usual latency (ms, time-weighted EWMAs) and when they were last updated
    lat_recent: float = 0.0
    lat_usual: float = 0.0
    lat_at: float = 0.0
    host: str = field(init=False, default="")
    port: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        rest = self.url.split("://", 1)[-1]
        host, _, port = rest.rpartition(":")
        self.host, self.port = host, int(port or 80)

    def observe_rtt(self, rtt_ms: float, now: float) -> None:
        """Peak-sensitive EWMA: a slower sample is taken at once, faster ones decay in."""
        if rtt_ms > self.rtt_ms or self.rtt_at == 0.0:
            self.rtt_ms = rtt_ms
        else:
            w = math.exp(-max(0.0, now - self.rtt_at) / DECAY_S)
            self.rtt_ms = self.rtt_ms * w + rtt_ms * (1.0 - w)
        self.rtt_at = now
        if self.lat_at == 0.0:
            self.lat_recent = self.lat_usual = rtt_ms
        else:
            dt = max(0.0, now - self.lat_at)
            self.lat_recent += (1.0 - math.exp(-dt / SPEED_RECENT_S)) * (rtt_ms - self.lat_recent)
            self.lat_usual += (1.0 - math.exp(-dt / SPEED_USUAL_S)) * (rtt_ms - self.lat_usual)
        self.lat_at = now

    def slowdown(self) -> float:
        """How many times slower than usual the endpoint answers now (1 at least, at most
        :data:`MAX_SLOWDOWN`): a backend whose service time tripled has a third of the
        capacity its weight was set for, until the next scores say so.

        >>> e = Endpoint("a", "http://127.0.0.1:1")
        >>> for t in range(60):
        ...     e.observe_rtt(100.0, float(t))
        >>> e.slowdown()
        1.0
        >>> for t in range(60, 70):
        ...     e.observe_rtt(300.0, float(t))
        >>> 2.0 < e.slowdown() < 3.0
        True
        """
        if self.lat_usual <= 0.0:
            return 1.0
        return min(MAX_SLOWDOWN, max(1.0, self.lat_recent / self.lat_usual))

    def observe_rif_latency(self, rtt_ms: float) -> None:
        """A successful response at the current in-flight level (Prequal's servers keep
        latency per requests-in-flight; the sidecar keeps it per endpoint)."""
        k = self.in_flight
        old = self.rif_latency.get(k)
        self.rif_latency[k] = rtt_ms if old is None else old + RIF_ALPHA * (rtt_ms - old)

    def latency_at(self, rif: int) -> float:
        """Estimated latency (ms) at ``rif`` in flight: that level's EWMA, else the
        nearest level measured below it, else the lowest measured; 0 when none."""
        tab = self.rif_latency
        if not tab:
            return 0.0
        if rif in tab:
            return tab[rif]
        below = [k for k in tab if k < rif]
        return tab[max(below)] if below else tab[min(tab)]

    def cost(self, now: float) -> float:
        """Peak-EWMA cost; an endpoint never measured costs 0 when idle (try it)."""
        if self.rtt_at == 0.0:
            return 0.0 if self.in_flight == 0 else 1e6 + self.in_flight
        w = math.exp(-max(0.0, now - self.rtt_at) / DECAY_S)
        return self.rtt_ms * w * (self.in_flight + 1)

    def available(self, now: float) -> bool:
        return self.ejected_until <= now

    def succeeded(self) -> None:
        self.consecutive_failures = 0
        if self.ejected_until:  # a success after re-admission: forgive past ejections
            self.ejected_until = 0.0
            self.ejections = 0

    def failed(self, now: float, eject_after: int, eject_s: float,
               may_eject: bool = True) -> bool:
        """Count a failure; True when it ejects the endpoint (outlier detection).
        ``may_eject`` False (the route's ejection cap is reached): the streak is kept, so
        the endpoint goes as soon as another one is re-admitted."""
        self.failures += 1
        self.consecutive_failures += 1
        if self.consecutive_failures >= eject_after and may_eject:
            self.ejections += 1
            self.ejected_until = now + min(MAX_EJECT_S, eject_s * 2 ** (self.ejections - 1))
            self.consecutive_failures = 0
            return True
        return False


class Policy(Protocol):
    """Picks one endpoint among non-empty ``candidates`` (all available)."""

    name: str

    def pick(self, candidates: Sequence[Endpoint], now: float) -> Endpoint: ...


class Predictive:
    """Weighted power-of-two-choices on peak-EWMA cost per unit of weight."""

    name = "predictive"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def pick(self, candidates: Sequence[Endpoint], now: float) -> Endpoint:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        # the weights as the scores set them, over how much slower each endpoint is now
        w = [e.weight / e.slowdown() for e in candidates]
        total = sum(w)
        if total <= 0:  # every candidate drained: still route (never "no routing")
            return candidates[self.rng.randrange(n)]
        i = _draw(w, total, self.rng)
        a, wa = candidates[i], w[i]
        rest = total - wa
        if rest <= 0:  # only ``a`` has weight
            return a
        others = [k for k in range(n) if k != i]
        j = others[_draw([w[k] for k in others], rest, self.rng)]
        b, wb = candidates[j], w[j]
        if wb <= 0:
            return a
        # lower reactive cost per unit of weight wins; ties keep the first draw
        return b if b.cost(now) * wa < a.cost(now) * wb else a


def _draw(weights: Sequence[float], total: float, rng: random.Random) -> int:
    x = rng.random() * total
    for i, w in enumerate(weights):
        x -= w
        if x < 0:
            return i
    return len(weights) - 1


class FirstAvailable:
    """The first candidate in configuration order."""

    name = "first-available"

    def pick(self, candidates: Sequence[Endpoint], now: float) -> Endpoint:
        return candidates[0]


class RoundRobin:
    """Candidates in turn."""

    name = "round-robin"

    def __init__(self) -> None:
        self._i = 0

    def pick(self, candidates: Sequence[Endpoint], now: float) -> Endpoint:
        self._i += 1
        return candidates[self._i % len(candidates)]


def two_distinct(rng: random.Random, candidates: Sequence[Endpoint]) -> tuple[Endpoint, Endpoint]:
    """The power-of-two-choices draw: two different candidates, uniformly (n >= 2)."""
    n = len(candidates)
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    j += j >= i
    return candidates[i], candidates[j]


class _TwoChoices:
    """Power-of-two-choices: of two distinct random candidates, the one with less load."""

    name = ""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def load(self, e: Endpoint, now: float) -> float:
        raise NotImplementedError

    def pick(self, candidates: Sequence[Endpoint], now: float) -> Endpoint:
        if len(candidates) == 1:
            return candidates[0]
        a, b = two_distinct(self.rng, candidates)
        return b if self.load(b, now) < self.load(a, now) else a


class LeastRequest(_TwoChoices):
    """Power-of-two-choices on in-flight requests."""

    name = "least-request"

    def load(self, e: Endpoint, now: float) -> float:
        return e.in_flight


class PeakEwma(_TwoChoices):
    """Power-of-two-choices on peak-EWMA cost (RTT × (in-flight + 1))."""

    name = "peak-ewma"

    def load(self, e: Endpoint, now: float) -> float:
        return e.cost(now)


@dataclass
class Probe:
    """One probe answer in the pool: an endpoint's requests-in-flight and latency."""

    endpoint: Endpoint
    rif: float
    latency_ms: float
    at: float  # when it was answered (usable from then on)
    uses: int = 0


#: Probe function: (endpoint, now) -> (requests-in-flight, latency estimate in ms).
ProbeFn = Callable[[Endpoint, float], tuple[float, float]]


def local_probe(e: Endpoint, now: float) -> tuple[float, float]:
    """What the sidecar itself knows of an endpoint: its in-flight requests through this
    sidecar and the latency of its successful requests at that in-flight level (ms; 0
    when never measured), the estimate a Prequal server reports."""
    return float(e.in_flight), e.latency_at(e.in_flight)


class Prequal:
    """Prequal: *Probing to Reduce Queuing and Latency* (Wydrowski, Kleinberg, Rumble et al.,
    "Load is not what you should balance: Introducing Prequal", NSDI 2024, arXiv 2312.10172; in
    production on YouTube).

    - **Asynchronous probes.** Each request triggers ``probe_rate`` probes of uniformly
      random endpoints; a probe answers with the endpoint's requests-in-flight (RIF) and
      its latency estimate, and is usable ``probe_delay_s`` later (off the request's
      critical path: a request never waits for a probe).
    - **A bounded pool reused across requests.** At most ``pool_size`` probes (the paper's
      pool of 16), the newest per endpoint; probes older than ``max_age_s`` are dropped,
      and a probe is dropped after ``reuse`` selections; each selection adds one to the
      chosen probe's RIF (the request just sent).
    - **The hot-cold rule** (hot-cold lexicographic): a probe is *hot* when its RIF is
      above the ``q_rif`` quantile of the RIFs in the pool (the paper sweeps
      Q_RIF in 0.6-0.9; 0.84 is used here). Among cold probes the lowest latency wins;
      when all are hot, the lowest RIF.
    - An empty pool (start, or all probes expired): power-of-two-choices on in-flight.

    Pool size 16 and the Q_RIF range are the paper's; the probe rate (3 per request),
    reuse budget (2) and maximum age (1 s) are this implementation's choices in the
    paper's spirit (several probes per query, probes reused only while fresh).

    In the sidecar a probe reads the sidecar's own view (:func:`local_probe`: in-flight
    through this sidecar, peak-EWMA latency); the simulator passes ``probe`` reading the
    backend's true RIF, as a probe RPC to the server would.
    """

    name = "prequal"

    def __init__(self, rng: random.Random | None = None, probe: ProbeFn | None = None,
                 probe_rate: int = 3, pool_size: int = 16, max_age_s: float = 1.0,
                 q_rif: float = 0.84, reuse: int = 2, probe_delay_s: float = 0.0) -> None:
        if pool_size < 1 or probe_rate < 1 or reuse < 1 or not 0.0 <= q_rif <= 1.0:
            raise ValueError("prequal: pool_size, probe_rate, reuse >= 1; q_rif in [0, 1]")
        self.rng = rng or random.Random()
        self.probe = probe or local_probe
        self.probe_rate, self.pool_size, self.max_age_s = probe_rate, pool_size, max_age_s
        self.q_rif, self.reuse, self.probe_delay_s = q_rif, reuse, probe_delay_s
        self.pool: list[Probe] = []
        self.probes_sent = 0

    def _send_probes(self, candidates: Sequence[Endpoint], now: float) -> None:
        for _ in range(self.probe_rate):
            e = candidates[self.rng.randrange(len(candidates))]
            rif, lat = self.probe(e, now)
            self.probes_sent += 1
            self.pool = [p for p in self.pool if p.endpoint is not e]  # newest per endpoint
            self.pool.append(Probe(e, rif, lat, now + self.probe_delay_s))
        if len(self.pool) > self.pool_size:  # evict the oldest
            self.pool.sort(key=lambda p: p.at)
            del self.pool[: len(self.pool) - self.pool_size]

    def pick(self, candidates: Sequence[Endpoint], now: float) -> Endpoint:
        if len(candidates) == 1:
            return candidates[0]
        allowed = {id(e) for e in candidates}
        self.pool = [p for p in self.pool if now - p.at <= self.max_age_s]
        usable = [p for p in self.pool if p.at <= now and id(p.endpoint) in allowed]
        self._send_probes(candidates, now)  # answers arrive for later requests
        if not usable:
            a, b = two_distinct(self.rng, candidates)
            return b if b.in_flight < a.in_flight else a
        rifs = sorted(p.rif for p in usable)
        threshold = rifs[min(len(rifs) - 1, int(self.q_rif * len(rifs)))]
        cold = [p for p in usable if p.rif <= threshold]
        best = (min(cold, key=lambda p: (p.latency_ms, p.rif)) if cold
                else min(usable, key=lambda p: p.rif))
        best.rif += 1
        best.uses += 1
        if best.uses >= self.reuse:
            self.pool = [p for p in self.pool if p is not best]
        return best.endpoint


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    """The policy called ``name`` (one of ``config.POLICY_NAMES``)."""
    if name == "predictive":
        return Predictive(rng)
    if name == "first-available":
        return FirstAvailable()
    if name == "round-robin":
        return RoundRobin()
    if name == "least-request":
        return LeastRequest(rng)
    if name == "peak-ewma":
        return PeakEwma(rng)
    if name == "prequal":
        return Prequal(rng)
    raise ValueError(f"unknown policy {name!r}")


def fallback_order(
    chosen: Endpoint, endpoints: Sequence[Endpoint], now: float, by_score: bool
) -> list[Endpoint]:
    """The endpoints to try after ``chosen`` failed: by weight (score order) when scores
    are fresh, else by peak-EWMA cost; ejected endpoints last, never dropped."""
    rest = [e for e in endpoints if e is not chosen]
    if by_score:
        rest.sort(key=lambda e: -e.weight)
    else:
        rest.sort(key=lambda e: e.cost(now))
    rest.sort(key=lambda e: not e.available(now))  # stable: keeps the order within groups
    return rest


def shed_plan(excess: float, class_shares: dict[int, float]) -> dict[int, float]:
    """Drop probability per priority class so that about ``excess`` (0..1) of all traffic
    is shed, lowest priority first (a class is shed whole before the next one is touched).

    >>> {k: round(v, 3) for k, v in shed_plan(0.3, {0: 0.2, 1: 0.6, 2: 0.2}).items()}
    {0: 1.0, 1: 0.167, 2: 0.0}
    """
    plan = dict.fromkeys(class_shares, 0.0)
    left = max(0.0, min(1.0, excess))
    for cls in sorted(class_shares):
        share = class_shares[cls]
        if left <= 0 or share <= 0:
            continue
        take = min(share, left)
        plan[cls] = take / share
        left -= take
    return plan
