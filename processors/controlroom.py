"""What the live control room shows, computed from scores: values in, values out.

Plain Python (no I/O): ``streams.api.ui`` hands in the API's latest scores, their
history, anomalies and mirror statuses, and sends the dicts built here to the browser
as JSON. Times are epoch milliseconds (the browser shows them in the viewer's zone).

**Time to exhaustion** of an endpoint follows the mirror planner's rule
(:meth:`processors.mirroring.RegionalDemand.crossing`): 0 when the current rate is above
capacity, else the first forecast point whose mean is above capacity, else none within
the forecast. The band's upper bound gives the earliest it *may* run out. The overview is
sorted by those two (soonest first), then by predicted utilisation.

**Chart series** of an endpoint put side by side, at each score's ``computed_at``: the
actual rate, and the forecast *for that time* made ``h`` steps before (the horizon-``h``
point of an earlier score whose ``at`` is nearest, within half a step), with its band and
the capacity line; then the latest score's whole forecast ahead.

>>> from schemas.records import ForecastPoint, LoadScore
>>> def score(t, cur, means, cap=100.0):
...     pts = tuple(ForecastPoint(h, t + 1000 * h, m, m - 5, m + 5)
...                 for h, m in enumerate(means, 1))
...     return LoadScore("e1", "orders", "eu", t, t + 5000, 0.5, cap, "CONFIGURED", cur,
...                      0.5, 12.0, 0.0, 0.0, 1, pts)
>>> exhaustion_ms(score(0, 50, [60, 96, 101]))
3000
>>> exhaustion_ms(score(0, 50, [60, 96, 101]), band=True)
2000
>>> exhaustion_ms(score(0, 50, [60])) is None, exhaustion_ms(score(0, 150, [60]))
(True, 0)
>>> c = chart([score(0, 50, [55, 60]), score(1000, 56, [61]), score(2000, 62, [70])], 2)
>>> c["t"], c["actual"], c["forecast"]
([0, 1000, 2000, 3000], [50, 56, 62, None], [None, None, 60, None])
>>> c["latest"]
[None, None, 62, 70]
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from schemas.records import LoadScore

ANOMALY_THRESHOLD = 0.8  # the anomaly detectors' default flag level (processors.anomaly)


def exhaustion_ms(score: LoadScore, *, band: bool = False) -> int | None:
    """Milliseconds from ``computed_at`` until demand first exceeds capacity (by the
    forecast mean, or its upper bound with ``band``); None if not within the forecast."""
    cap = score.capacity_rps
    if not cap > 0 or not math.isfinite(cap):
        return None
    if score.current_rps > cap:
        return 0
    for p in score.forecast:  # in horizon order, as the worker writes them
        if (p.upper if band else p.mean) > cap:
            return max(0, p.at - score.computed_at)
    return None


def horizon_point(score: LoadScore, horizon: int | None = None) -> dict[str, Any] | None:
    """The forecast point at ``horizon`` steps (the farthest when None or not there)."""
    if not score.forecast:
        return None
    pts = sorted(score.forecast, key=lambda p: p.horizon)
    chosen = next((p for p in pts if p.horizon == horizon), pts[-1])
    return {"horizon": chosen.horizon, "at": chosen.at, "mean": chosen.mean,
            "lower": chosen.lower, "upper": chosen.upper,
            "ahead_s": chosen.horizon * score.step_seconds}


def _anomalous(score: LoadScore, anomaly: Mapping[str, Any] | None) -> bool:
    level = float(anomaly.get("threshold", ANOMALY_THRESHOLD)) if anomaly else \
        ANOMALY_THRESHOLD
    return score.anomaly_score >= level


def overview(scores: Iterable[LoadScore], anomalies: Mapping[str, Mapping[str, Any]],
             now_ms: int, *, horizon: int | None = None, limit: int = 200
             ) -> list[dict[str, Any]]:
    """One row per endpoint (at most ``limit``), the soonest to run out first. Only the
    rows kept are built (the ranking is a heap over all endpoints)."""
    def left_s(s: LoadScore, ms: int | None) -> float | None:
        # counted from now, not from computed_at: what the operator has left
        return None if ms is None else max(0.0, (s.computed_at + ms - now_ms) / 1000)

    inf = math.inf
    ranked = []
    for s in scores:
        mean_s, band_s = left_s(s, exhaustion_ms(s)), left_s(s, exhaustion_ms(s, band=True))
        ranked.append(((inf if mean_s is None else mean_s, inf if band_s is None else band_s,
                        -s.predicted_utilization, s.endpoint_id), s, mean_s, band_s))
    top = heapq.nsmallest(limit, ranked, key=lambda r: r[0])
    return [_row(s, anomalies.get(s.endpoint_id), now_ms, horizon, mean_s, band_s)
            for _, s, mean_s, band_s in top]


def _row(s: LoadScore, anomaly: Mapping[str, Any] | None, now_ms: int, horizon: int | None,
         mean_s: float | None, band_s: float | None) -> dict[str, Any]:
    return {
        "endpoint_id": s.endpoint_id, "api": s.api, "region": s.region,
        "computed_at": s.computed_at, "valid_until": s.valid_until,
        "stale": now_ms > s.valid_until,
        "current_rps": s.current_rps, "capacity_rps": s.capacity_rps,
        "capacity_source": s.capacity_source, "score": s.score,
        "utilization": s.predicted_utilization,
        "forecast": horizon_point(s, horizon),
        "exhaustion_s": mean_s, "band_exhaustion_s": band_s,
        "anomaly_score": s.anomaly_score, "anomalous": _anomalous(s, anomaly),
        "anomaly_at": anomaly.get("detected_at") if anomaly else None,
        "latency_p99_ms": s.latency_p99_ms, "error_rate": s.error_rate,
        "model": s.model, "reasons": list(s.reasons),
    }


def chart(history: Sequence[LoadScore], horizon: int | None = None, *,
          anomaly: Mapping[str, Any] | None = None, points: int = 240) -> dict[str, Any]:
    """Aligned series of one endpoint's last ``points`` scores (see the module doc);
    ``None`` where a series has no value. ``horizon`` None: the farthest of the latest."""
    hist = list(history)[-points:]
    if not hist:
        return {"t": [], "actual": [], "forecast": [], "lower": [], "upper": [],
                "capacity": [], "latest": [], "anomalies": [], "horizon": horizon}
    latest = hist[-1]
    if horizon is None:
        horizon = max((p.horizon for p in latest.forecast), default=1)
    made_before = sorted(
        (p.at, p.mean, p.lower, p.upper) for s in history for p in s.forecast
        if p.horizon == horizon)
    ats = [m[0] for m in made_before]
    t: list[int] = []
    out: dict[str, list[Any]] = {k: [] for k in
                                 ("actual", "forecast", "lower", "upper", "capacity",
                                  "latest", "anomalies")}
    for s in hist:
        f = _nearest(made_before, ats, s.computed_at, s.step_seconds * 500)
        t.append(s.computed_at)
        out["actual"].append(s.current_rps)
        out["forecast"].append(f[1] if f else None)
        out["lower"].append(f[2] if f else None)
        out["upper"].append(f[3] if f else None)
        out["capacity"].append(s.capacity_rps)
        out["latest"].append(None)
        out["anomalies"].append(s.current_rps if _anomalous(s, anomaly) else None)
    out["latest"][-1] = latest.current_rps  # the latest forecast starts where we are
    for p in sorted(latest.forecast, key=lambda p: p.at):
        if p.at <= t[-1]:
            continue
        t.append(p.at)
        for k in ("actual", "forecast", "lower", "upper", "anomalies"):
            out[k].append(None)
        out["capacity"].append(latest.capacity_rps)
        out["latest"].append(p.mean)
    return {"t": t, **out, "horizon": horizon}


def _nearest(made: list[tuple[int, float, float, float]], ats: list[int], t: int,
             tolerance_ms: int) -> tuple[int, float, float, float] | None:
    i = bisect.bisect_left(ats, t)
    best = min((made[j] for j in (i - 1, i) if 0 <= j < len(made)),
               key=lambda m: abs(m[0] - t), default=None)
    return best if best is not None and abs(best[0] - t) <= tolerance_ms else None


def demand_crossed(history: Iterable[Sequence[LoadScore]], api: str, region: str,
                   after_ms: int) -> int | None:
    """When the actual demand of ``api`` in ``region`` (the sum of its endpoints' latest
    rates) first exceeded their summed capacity, at or after ``after_ms`` (the mirror's
    command), replaying the histories in time order; None if not seen. The planner
    judges the same sum, against a configured central capacity when it has one, which
    the API does not know.

    >>> from schemas.records import LoadScore
    >>> def s(e, t, cur):
    ...     return LoadScore(e, "orders", "eu", t, t + 5000, 0.5, 10.0, "CONFIGURED", cur,
    ...                      0.5, 12.0, 0.0, 0.0, 1, ())
    >>> demand_crossed([[s("a", 0, 9), s("a", 2000, 12)], [s("b", 1000, 9)]],
    ...                "orders", "eu", 0)  # 9 + 9 < 20 at 1 s; 12 + 9 > 20 at 2 s
    2000
    """
    scores = sorted((s for hist in history for s in hist
                     if s.api == api and s.region == region),
                    key=lambda s: s.computed_at)
    current: dict[str, tuple[float, float]] = {}  # endpoint -> (rate, capacity)
    for s in scores:
        current[s.endpoint_id] = (s.current_rps, s.capacity_rps)
        if s.computed_at >= after_ms and sum(c for c, _ in current.values()) > \
                sum(cap for _, cap in current.values()):
            return s.computed_at
    return None


def mirror_rows(mirrors: Iterable[Mapping[str, Any]],
                history: Mapping[str, Sequence[LoadScore]]) -> list[dict[str, Any]]:
    """Mirrors per region: state, when commanded (first status of the command), when
    ready, when the region's demand crossed its capacity and the lead time (crossed −
    ready; positive: ready early). ``mirrors`` are MirrorView-like dicts (region, api,
    state, at, command_id, since)."""
    rows = []
    for m in mirrors:
        since: Mapping[str, int] = m.get("since") or {}
        commanded = min(since.values(), default=m["at"])
        ready = since.get("READY")
        crossed = demand_crossed(history.values(), m["api"], m["region"], commanded)
        rows.append({
            "region": m["region"], "api": m["api"], "state": m["state"],
            "activity": _activity(m["state"]), "command_id": m["command_id"],
            "commanded_at": commanded, "ready_at": ready, "crossed_at": crossed,
            "lead_s": None if ready is None or crossed is None else (crossed - ready) / 1000,
            "instance_url": m.get("instance_url"), "capacity_rps": m.get("capacity_rps"),
            "reason": m.get("reason", ""), "at": m["at"],
        })
    rows.sort(key=lambda r: (r["region"], r["api"]))
    return rows


def _activity(state: str) -> str:
    """The executor's state as the operator reads it."""
    return {"COMMANDED": "commanded", "RETIRE_COMMANDED": "retiring (commanded)",
            "ACCEPTED": "activating", "STARTING": "activating", "READY": "ready",
            "DRAINING": "retiring", "RETIRED": "retired", "REJECTED": "rejected",
            "FAILED": "failed"}.get(state, state.lower())


def stale_endpoints(scores: Iterable[LoadScore], now_ms: int) -> list[str]:
    """Endpoints whose latest score is past ``valid_until``, sorted."""
    return sorted(s.endpoint_id for s in scores if now_ms > s.valid_until)
