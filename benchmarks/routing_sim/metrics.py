"""Per-phase metrics of a run, and their mean and 95 % interval over seeds.

Latency percentiles are over every request a backend answered or dropped (shed requests
excluded), as the sidecar measured them: a request that outlived the client's deadline
counts with its full time (and as an error). ``errors`` = answered after the deadline or
expired in a queue; ``shed`` = rejected at once (backend queue full, sidecar shedding, no
endpoint). Both are percentages of the phase's requests.

``time_to_react``: seconds from an event's onset until, for 3 seconds in a row, no
backend is sent more than ``1.1 x`` its effective capacity (0: never overloaded; None:
not within the phase). ``time_to_recover``: seconds from onset until the per-second p99
is within ``slo_ms`` and errors + shed within 1 % for 5 seconds in a row. ``weight_churn``:
per telemetry interval, the share of traffic that moved between backends
(``sum |d share| / 2``), averaged.

>>> [round(x, 3) for x in mean_ci([1.0, 2.0, 3.0])]
[2.0, 2.484]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.routing_sim.engine import ERROR_OUTCOMES, OK, SHED_OUTCOMES, RunResult

# two-sided 95 % Student-t quantiles, df = 1..30 (no scipy needed for this)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Phase:
    """A named time window [start, end) in sim seconds; ``onset`` for event phases."""

    name: str
    spans: tuple[tuple[float, float], ...]
    onset: float | None = None
    event_end: float | None = None
    affected: int | None = None  # backend index the event is about (degradation)


def _mask(t: np.ndarray, spans: Sequence[tuple[float, float]]) -> np.ndarray:
    m = np.zeros(t.shape, dtype=bool)
    for a, b in spans:
        m |= (t >= a) & (t < b)
    return m


def _pct(x: np.ndarray, q: float) -> float | None:
    return float(np.percentile(x, q)) if x.size else None


def phase_metrics(r: RunResult, phase: Phase, slo_ms: float) -> dict[str, Any]:
    """The metrics of one phase of one run (see the module docstring)."""
    m = _mask(r.t_arrival, phase.spans)
    out = r.outcome[m]
    n = int(m.sum())
    served = ~np.isin(out, SHED_OUTCOMES)
    lat = r.rtt_ms[m][served]
    errors = int(np.isin(out, ERROR_OUTCOMES).sum())
    shed = int(np.isin(out, SHED_OUTCOMES).sum())
    res: dict[str, Any] = {
        "requests": n,
        "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99),
        "p999_ms": _pct(lat, 99.9),
        "errors_pct": 100.0 * errors / n if n else 0.0,
        "shed_pct": 100.0 * shed / n if n else 0.0,
        "success_pct": 100.0 * float((out == OK).sum()) / n if n else 0.0,
    }
    res["errors_plus_shed_pct"] = res["errors_pct"] + res["shed_pct"]
    secs = [s for a, b in phase.spans for s in range(math.ceil(a), int(b))]
    secs = [s for s in secs if s < r.busy.shape[1]]
    limited = [i for i, s in enumerate(r.slots) if s is not None]
    if limited and secs:
        util = np.array([r.busy[i, secs] / r.slots[i] for i in limited])
        res["util_max"] = float(util.max())
        res["util_avg"] = float(util.mean())
        # per-backend utilization averaged over the phase: how even the load was
        res["util_backend_max"] = float(util.mean(axis=1).max())
    else:
        res["util_max"] = res["util_avg"] = res["util_backend_max"] = None
    res["weight_churn"] = churn(r, phase.spans)
    if phase.onset is not None:
        end = max(b for _, b in phase.spans)
        res["time_to_react_s"] = time_to_react(r, phase.onset, end)
        res["time_to_recover_s"] = time_to_recover(r, phase.onset, end, slo_ms)
    return res


def churn(r: RunResult, spans: Sequence[tuple[float, float]]) -> float | None:
    iv = max(1, round(r.interval_s))
    vals: list[float] = []
    for a, b in spans:
        prev = None
        for s in range(math.ceil(a), int(b) - iv + 1, iv):
            d = r.dispatched[:, s:s + iv].sum(axis=1)
            tot = d.sum()
            if tot <= 0:
                continue
            share = d / tot
            if prev is not None:
                vals.append(float(np.abs(share - prev).sum() / 2))
            prev = share
    return float(np.mean(vals)) if vals else None


def time_to_react(r: RunResult, onset: float, end: float, over: float = 1.1,
                  hold: int = 3) -> float | None:
    if all(s is None for s in r.slots):
        return None
    lo = int(onset)
    hi = min(int(end), r.dispatched.shape[1])
    ok = np.all(r.dispatched[:, lo:hi] <= over * r.capacity[:, lo:hi], axis=0)
    run = 0
    for k, good in enumerate(ok):
        run = run + 1 if good else 0
        if run >= hold:
            return float(k - hold + 1)
    return None


def time_to_recover(r: RunResult, onset: float, end: float, slo_ms: float,
                    hold: int = 5, max_bad_pct: float = 1.0) -> float | None:
    lo, hi = int(onset), int(end)
    sec = r.t_arrival.astype(np.int64)
    m = (sec >= lo) & (sec < hi)
    s_sec, s_out, s_rtt = sec[m], r.outcome[m], r.rtt_ms[m]
    order = np.argsort(s_sec, kind="stable")
    s_sec, s_out, s_rtt = s_sec[order], s_out[order], s_rtt[order]
    bounds = np.searchsorted(s_sec, np.arange(lo, hi + 1))
    run = 0
    for k in range(hi - lo):
        a, b = bounds[k], bounds[k + 1]
        good = True
        if b > a:
            out = s_out[a:b]
            bad = np.isin(out, ERROR_OUTCOMES + SHED_OUTCOMES).mean() * 100.0
            lat = s_rtt[a:b][~np.isin(out, SHED_OUTCOMES)]
            p99 = float(np.percentile(lat, 99)) if lat.size else 0.0
            good = bad <= max_bad_pct and p99 <= slo_ms
        run = run + 1 if good else 0
        if run >= hold:
            return float(k - hold + 1)
    return None


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95 % Student-t interval (0 for one value)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), 0.0
    t = _T95[min(x.size - 1, len(_T95)) - 1]
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(x.size))


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per metric over seeds: mean, 95 % half-width, values; None values counted apart
    (``never``: e.g. a policy that never reacted)."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], int | float) or runs[0][k] is None]
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in runs]
        got = [float(v) for v in vals if v is not None]
        mean, half = mean_ci(got) if got else (None, None)
        med = float(np.median(got)) if got else None
        out[k] = {"mean": mean, "ci95": half, "median": med, "never": len(vals) - len(got),
                  "values": vals}
    return out
