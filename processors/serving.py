"""Answering forecast questions from a LoadScore: values in, values out.

A score's curve is ``current_rps`` at horizon 0 (what was observed) and its forecast
points (horizon ``h`` at ``at``, mean with a 90 % band). A question names
horizons in model steps, or instants (epoch ms); a horizon or instant between two points
is interpolated linearly (mean and both band edges), one outside the curve is an error
that says the range, never a guess. Predicted utilization is the value over the capacity
(no utilization when the capacity is not positive). The data's age and staleness
(past ``valid_until``) go with every answer.

>>> from schemas.records import ForecastPoint, LoadScore
>>> s = LoadScore("e1", "orders", "eu", 600_000, 720_000, 0.8, 100.0, "CONFIGURED",
...               20.0, 0.5, 12.0, 0.0, 0.0, 60,
...               (ForecastPoint(1, 660_000, 40.0, 30.0, 50.0),
...                ForecastPoint(2, 720_000, 60.0, 50.0, 80.0)))
>>> a = answer(s, horizons=[2], now_ms=630_000)
>>> a["points"][0]["mean"], a["points"][0]["utilization"], a["age_s"], a["stale"]
(60.0, 0.6, 30.0, False)
>>> answer(s, times=[690_000], now_ms=800_000)["points"][0]["upper"], \\
...     answer(s, now_ms=800_000)["stale"]
(65.0, True)
>>> try:
...     answer(s, horizons=[3], now_ms=0)
... except ServingError as e:
...     print(e.field, "|", e.message)
horizons | 3 is outside the forecast (0 to 2 steps)
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from schemas.records import LoadScore

Point = dict[str, Any]


class ServingError(ValueError):
    """A question the score cannot answer; ``field`` names the part of the question."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def utilization(value: float, capacity_rps: float) -> float | None:
    """``value`` / ``capacity_rps``; None when there is no positive capacity."""
    return value / capacity_rps if capacity_rps > 0 else None


def curve(score: LoadScore) -> list[tuple[float, int, float, float, float]]:
    """(horizon, at, mean, lower, upper) from horizon 0 (``current_rps``) through the
    forecast, sorted by horizon. Horizon 0 lies one step before horizon 1 on the
    forecast's own time axis (``computed_at`` without points): a replayed trace's points
    carry the trace's times while ``computed_at`` is the wall clock of the scoring."""
    ahead = sorted((p for p in score.forecast if p.horizon > 0), key=lambda p: p.horizon)
    at0 = ahead[0].at - ahead[0].horizon * score.step_seconds * 1000 if ahead \
        else score.computed_at
    now = score.current_rps
    out = [(0.0, at0, now, now, now)]
    out.extend((float(p.horizon), p.at, p.mean, p.lower, p.upper) for p in ahead)
    return out


def _point(c: list[tuple[float, int, float, float, float]], i: int, keys: list[float],
           x: float, key: int) -> tuple[float, float, float, float, float]:
    """The curve at ``x`` on axis ``key`` (0 horizon, 1 at), interpolating at index i."""
    hi = c[i]
    if keys[i] == x or i == 0:
        return hi[0], float(hi[1]), hi[2], hi[3], hi[4]
    lo = c[i - 1]
    f = (x - keys[i - 1]) / (keys[i] - keys[i - 1])
    return tuple(a + f * (b - a) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def lookup(score: LoadScore, *, horizons: Sequence[float] | None = None,
           times: Sequence[int] | None = None) -> list[Point]:
    """The curve at ``horizons`` (steps) or ``times`` (epoch ms), each with utilization;
    every forecast point when neither is given. Raises :class:`ServingError`."""
    c = curve(score)
    cap = score.capacity_rps
    if horizons is None and times is None:
        picked = [(h, float(at), m, lo, up) for h, at, m, lo, up in c[1:]]
        if not picked:
            raise ServingError("horizons", "the score has no forecast points yet")
    else:
        axis, asked, name = (0, horizons, "horizons") if horizons is not None \
            else (1, times, "times")
        keys = [float(p[axis]) for p in c]
        picked = []
        for x in asked or ():
            xf = float(x)
            if not keys[0] <= xf <= keys[-1]:
                unit = "steps" if axis == 0 else "ms"
                lo_s = f"{keys[0]:g}" if axis == 0 else str(int(keys[0]))
                hi_s = f"{keys[-1]:g}" if axis == 0 else str(int(keys[-1]))
                raise ServingError(name, f"{x} is outside the forecast ({lo_s} to {hi_s} {unit})")
            picked.append(_point(c, bisect_left(keys, xf), keys, xf, axis))
    out = []
    for h, at, m, lo, up in picked:
        out.append({
            "horizon": h, "at": round(at), "mean": m, "lower": lo, "upper": up,
            "utilization": m / cap if cap > 0 else None,
            "utilization_upper": up / cap if cap > 0 else None,
        })
    return out


def answer(score: LoadScore, *, horizons: Sequence[float] | None = None,
           times: Sequence[int] | None = None, now_ms: int) -> dict[str, Any]:
    """Everything one endpoint answers: identity, freshness, capacity and the points."""
    return {
        "endpoint_id": score.endpoint_id,
        "api": score.api,
        "region": score.region,
        "computed_at": score.computed_at,
        "valid_until": score.valid_until,
        "age_s": max(0.0, (now_ms - score.computed_at) / 1000),
        "stale": now_ms > score.valid_until,
        "model": score.model,
        "step_seconds": score.step_seconds,
        "score": score.score,
        "capacity_rps": score.capacity_rps,
        "capacity_source": score.capacity_source,
        "current_rps": score.current_rps,
        "points": lookup(score, horizons=horizons, times=times),
    }
