"""The demo's scenario as plain values: the compressed trace shape, the topology, the
phases, and the open-loop arrival schedule (seeded, so every policy lane gets the same).

The real ELB request-count trace (5-minute steps over 14 days) is compressed so that one
day becomes one *season* of ``season_s`` seconds: each day is cut into ``season_s`` equal
bins and each bin's mean is one second of demo traffic, normalised by the trace's 95th
percentile bin (capped at 1.25).
So the demo's load rises and falls like a real day of API traffic, a day a minute.

>>> shape = [[0.5, 1.0], [0.25, 0.5]]
>>> sc = Scenario(live_seconds=4, season_s=2, history_seasons=0)
>>> round(central_rate(sc, shape, 1.0), 1) == round(sc.central_peak_rps, 1)
True
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from streams.edge.replay import Trace

API = "orders"  # the API the demo serves
CLIENT_API = "demo-client"  # client-side measurements of each lane (not routed)
# an arrival the load generator sends more than this after its time is late: the report
# then says the lanes' latencies measure the demo machine rather than the policies
LATE_ARRIVAL_S = 0.5
# the live run starts at least this long before an edge spike (a few seconds of live
# telemetry and scores before the first one)
SPIKE_LEAD_S = 5
CENTRAL, EDGE = "central", "edge"
#: The policy lanes. ``predictive-persistence`` is the ablation: the whole predictive
#: pipeline (its own worker, planner, executor and mirrors) with the forecaster replaced
#: by persistence, so the report can say how much of a gain is the forecast's.
POLICIES = ("predictive", "predictive-persistence", "round-robin", "peak-ewma")
PREDICTIVE = ("predictive", "predictive-persistence")  # lanes fed by a forecasting pipeline
PREFIX = {"predictive": "", "predictive-persistence": "pp-", "round-robin": "rr-",
          "peak-ewma": "ewma-"}


@dataclass(frozen=True)
class BackendSpec:
    """One simulated API backend: ``slots`` workers of ``service_ms`` each (capacity =
    slots × 1000 / service_ms requests/s), a bounded queue, and an optional slow-down."""

    id: str
    region: str
    slots: int
    service_ms: float
    queue_limit: int
    degrade: tuple[float, float, float] | None = None  # (start epoch s, end epoch s, factor)

    @property
    def capacity_rps(self) -> float:
        return self.slots * 1000.0 / self.service_ms


@dataclass(frozen=True)
class Scenario:
    """Everything that shapes a run; times in seconds relative to the live start."""

    live_seconds: int = 240
    season_s: int = 60
    # Six compressed days of history: the forecaster's multi-season mean then averages
    # out enough of the days' noise to beat seasonal-naive (one day back) at the planner's
    # horizon; with three it barely does (offline: MASE 0.81 against 0.68 on central
    # demand). Replayed flat out, so it costs seconds, not minutes.
    history_seasons: int = 6
    service_ms: float = 100.0
    central_slots: tuple[int, ...] = (2, 2, 1)  # 20 + 20 + 10 = 50 rps per lane
    edge_slots: tuple[int, ...] = (1, 1)  # 10 + 10 = 20 rps per lane
    central_peak_rps: float = 40.0  # central demand at the trace's peak (80 % of capacity)
    edge_peak_rps: float = 12.0  # edge demand at the trace's peak, before the spike
    spike: tuple[int, int, float] = (36, 46, 4.0)  # season positions [a, b), edge factor
    degrade_endpoint: int = 1  # central backend index that slows down
    # share of the live run, factor. 41 s: the spikes leave 50 s between them, and the
    # window keeps 3 s from each; at 48 s (0.35-0.55) it met a spike whatever the live
    # start, so the degraded phase had measured a spike too.
    degrade: tuple[float, float, float] = (0.35, 0.52, 3.0)
    mirror_slots: int = 4  # the edge mirror: 40 rps
    seed: int = 7
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> Scenario:
        """About a minute of live traffic: one compressed day, one degradation, one spike."""
        return cls(live_seconds=60, degrade=(0.25, 0.5, 3.0))

    def live_start(self, t0: float, earliest: float) -> float:
        """The first whole epoch second from ``earliest`` at which the live run may start:
        not inside an edge spike, nor in the :data:`SPIKE_LEAD_S` seconds before one nor
        the 3 after. A run that began inside a spike (its first second ~50 % errors in
        every lane, measured) put the start-up into the spike phase, and it was cut short.

        >>> sc = Scenario(season_s=60, spike=(36, 46, 4.0))
        >>> sc.live_start(0.0, 10.0), sc.live_start(0.0, 35.0), sc.live_start(0.0, 60.5)
        (10.0, 49.0, 61.0)
        """
        a, b, _ = self.spike
        t = float(math.ceil(earliest))
        for _ in range(self.season_s):
            pos = (t - t0) % self.season_s
            if not (a - SPIKE_LEAD_S <= pos < b + 3):
                return t
            t += 1.0
        return float(math.ceil(earliest))  # the spikes fill the season: nowhere is better

    def degrade_window(self, t0: float, t_live: float) -> tuple[float, float]:
        """Epoch seconds [start, end) of the central backend's slow-down: its share of the
        live run (``degrade``), moved later (else earlier) as little as needed to keep 3 s
        away from every edge spike, so each phase measures one thing.

        >>> sc = Scenario(live_seconds=60, season_s=60, spike=(20, 30, 4.0),
        ...               degrade=(0.25, 0.5, 3.0))
        >>> sc.degrade_window(0.0, 0.0)    # [15, 30) would meet the spike [20, 30)
        (33.0, 48.0)
        """
        a, b, _ = self.degrade
        length = (b - a) * self.live_seconds
        start, last = t_live + a * self.live_seconds, t_live + self.live_seconds - length
        spikes = self.spike_windows(t0, t_live)
        tries = [start + k for k in range(int(last - start) + 1)]
        tries += [start - k for k in range(1, int(start - t_live) + 1)]
        for s in tries:
            if all(s + length + 3 <= x or s >= y + 3 for x, y in spikes):
                return s, s + length
        return start, start + length

    def spike_windows(self, t0: float, t_live: float) -> list[tuple[float, float]]:
        """Epoch seconds [start, end) of every edge spike in the live run; seasons count
        from ``t0``, the history start."""
        out = []
        a, b, _ = self.spike
        end = t_live + self.live_seconds
        k = int((t_live - t0) // self.season_s) - 1
        while t0 + k * self.season_s < end:
            s, e = t0 + k * self.season_s + a, t0 + k * self.season_s + b
            if e > t_live and s < end:
                out.append((max(s, t_live), min(e, end)))
            k += 1
        return out


def endpoint_id(policy: str, region: str, i: int) -> str:
    """``orders-central-1`` for the predictive lane, ``rr-orders-central-1`` etc. otherwise."""
    return f"{PREFIX[policy]}{API}-{region}-{i}"


def backends(sc: Scenario, t0: float, t_live: float) -> dict[str, list[BackendSpec]]:
    """Per policy lane, identical backends (same capacities, same slow-down window)."""
    d0, d1 = sc.degrade_window(t0, t_live)
    out: dict[str, list[BackendSpec]] = {}
    for policy in POLICIES:
        lane = []
        for region, slots in ((CENTRAL, sc.central_slots), (EDGE, sc.edge_slots)):
            for i, n in enumerate(slots, 1):
                deg = (d0, d1, sc.degrade[2]) if (region == CENTRAL and
                                                    i - 1 == sc.degrade_endpoint) else None
                lane.append(BackendSpec(endpoint_id(policy, region, i), region, n,
                                        sc.service_ms, queue_limit=n * 10, degrade=deg))
        out[policy] = lane
    return out


def day_shapes(trace: Trace, season_s: int) -> list[list[float]]:
    """Each whole UTC day of ``trace`` as ``season_s`` bin means, divided by the peak bin.

    >>> rows = [(d * 86400 + h * 3600, float(h + 1)) for d in range(2) for h in range(24)]
    >>> s = day_shapes(Trace(rows, 3600), 4)
    >>> len(s), [round(v, 2) for v in s[0]]
    (2, [0.16, 0.44, 0.72, 1.0])
    """
    days: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for ts, v in trace.rows:
        days[datetime.fromtimestamp(ts, UTC).date().isoformat()].append((ts, v))
    whole = [rows for rows in days.values() if len(rows) * trace.step_seconds >= 86_400 * 0.95]
    if not whole:
        raise ValueError("the trace has no whole day to compress")
    shapes = []
    for rows in whole:
        t0 = datetime.fromtimestamp(rows[0][0], UTC).replace(hour=0, minute=0, second=0)
        start = t0.timestamp()
        bins: list[list[float]] = [[] for _ in range(season_s)]
        for ts, v in rows:
            bins[min(season_s - 1, int((ts - start) / 86_400 * season_s))].append(v)
        means = [sum(b) / len(b) if b else math.nan for b in bins]
        for i, m in enumerate(means):  # a bin without rows: its neighbour's value
            if math.isnan(m):
                means[i] = means[i - 1] if i else next(x for x in means if not math.isnan(x))
        shapes.append(means)
    # The 95th percentile bin is "peak": a few outlier bins may go a little over it.
    ordered = sorted(v for s in shapes for v in s)
    peak = ordered[int(0.95 * len(ordered))] or 1.0
    return [[min(1.25, v / peak) for v in s] for s in shapes]


def _shape_at(sc: Scenario, shapes: list[list[float]], t_rel: float) -> float:
    """The normalised load at ``t_rel`` seconds after the *history* start."""
    day = int(t_rel // sc.season_s) % len(shapes)
    return shapes[day][int(t_rel % sc.season_s)]


def central_rate(sc: Scenario, shapes: list[list[float]], level: float) -> float:
    """Central requests/s at a normalised load level."""
    return sc.central_peak_rps * level


def edge_rate(sc: Scenario, level: float, season_pos: float) -> float:
    """Edge requests/s at a load level and season position (the spike multiplies it)."""
    a, b, f = sc.spike
    return sc.edge_peak_rps * level * (f if a <= season_pos < b else 1.0)


def rates_at(sc: Scenario, shapes: list[list[float]], t_rel: float) -> tuple[float, float]:
    """(central, edge) requests/s ``t_rel`` seconds after the history start (history and
    live follow the same compressed days, so the seasonal forecaster can learn them)."""
    level = _shape_at(sc, shapes, t_rel)
    return central_rate(sc, shapes, level), edge_rate(sc, level, t_rel % sc.season_s)


def schedule(sc: Scenario, shapes: list[list[float]], live_offset: float,
             ) -> list[tuple[float, str]]:
    """Poisson arrivals (seconds after the live start, region) for the whole live run;
    ``live_offset`` = seconds from the history start to the live start. Seeded: the same
    schedule is sent to every policy lane.

    >>> sc = Scenario(live_seconds=5, season_s=5, history_seasons=1)
    >>> arr = schedule(sc, [[1.0] * 5], 5.0)
    >>> arr == schedule(sc, [[1.0] * 5], 5.0), all(0 <= t < 5 for t, _ in arr)
    (True, True)
    """
    rng = random.Random(sc.seed)
    out: list[tuple[float, str]] = []
    for sec in range(sc.live_seconds):
        c, e = rates_at(sc, shapes, live_offset + sec)
        for region, rate in ((CENTRAL, c), (EDGE, e)):
            t = 0.0
            while True:
                t += rng.expovariate(rate) if rate > 0 else 2.0
                if t >= 1.0:
                    break
                out.append((sec + t, region))
    out.sort()
    return out


def phase_of(sc: Scenario, t0: float, t_live: float, at: float) -> str:
    """``degraded``, ``spike`` or ``steady`` for epoch second ``at``."""
    d0, d1 = sc.degrade_window(t0, t_live)
    if d0 <= at < d1:
        return "degraded"
    if any(a <= at < b for a, b in sc.spike_windows(t0, t_live)):
        return "spike"
    return "steady"
