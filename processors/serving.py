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


Row = tuple[float, float, float, float, float]  # horizon, at, mean, lower, upper


class Curve:
    """A score made ready to answer many questions: built once per score (the API keeps
    one per endpoint), its exact points shared by every answer (never mutate them)."""

    __slots__ = ("_exact", "_forecast", "_head", "_keys", "_rows", "score")

    def __init__(self, score: LoadScore) -> None:
        self.score = score
        self._rows: list[Row] = [(h, float(at), m, lo, up) for h, at, m, lo, up in curve(score)]
        self._keys = ([r[0] for r in self._rows], [r[1] for r in self._rows])
        self._exact: tuple[dict[float, Any], dict[float, Any]] = (
            {r[0]: self._value(r) for r in self._rows}, {})
        self._exact[1].update((r[1], self._exact[0][r[0]]) for r in self._rows)
        self._forecast = [self._exact[0][r[0]] for r in self._rows[1:]]
        self._head = {
            "endpoint_id": score.endpoint_id, "api": score.api, "region": score.region,
            "computed_at": score.computed_at, "valid_until": score.valid_until,
            "age_s": 0.0, "stale": False, "model": score.model,
            "step_seconds": score.step_seconds, "score": score.score,
            "capacity_rps": score.capacity_rps, "capacity_source": score.capacity_source,
            "current_rps": score.current_rps,
        }

    def _value(self, r: Row) -> Any:
        """The point of row ``r`` as answered (a subclass may answer it pre-encoded)."""
        return self.point(r)

    def point(self, r: Row) -> Point:
        """The point of row ``r``: the row's values and utilization."""
        cap = self.score.capacity_rps
        h, at, m, lo, up = r
        return {"horizon": h, "at": round(at), "mean": m, "lower": lo, "upper": up,
                "utilization": m / cap if cap > 0 else None,
                "utilization_upper": up / cap if cap > 0 else None}

    def _at(self, axis: int, x: float, name: str, asked: float) -> Any:
        exact = self._exact[axis].get(x)
        if exact is not None:
            return exact
        keys = self._keys[axis]
        if not keys[0] <= x <= keys[-1]:
            lo_s, hi_s, unit = ((f"{keys[0]:g}", f"{keys[-1]:g}", "steps") if axis == 0
                                else (str(int(keys[0])), str(int(keys[-1])), "ms"))
            raise ServingError(name, f"{asked} is outside the forecast ({lo_s} to {hi_s} {unit})")
        i = bisect_left(keys, x)
        lo, hi = self._rows[i - 1], self._rows[i]
        f = (x - keys[i - 1]) / (keys[i] - keys[i - 1])
        row = tuple(a + f * (b - a) for a, b in zip(lo, hi, strict=True))
        return self._value(row)  # type: ignore[arg-type]

    def points(self, *, horizons: Sequence[float] | None = None,
               times: Sequence[int] | None = None) -> list[Any]:
        """The curve at ``horizons`` (steps) or ``times`` (epoch ms), each with
        utilization; every forecast point when neither is given. Raises
        :class:`ServingError`."""
        if horizons is not None:
            exact = self._exact[0]  # ints find their float keys: equal values, equal hashes
            found = [exact.get(h) for h in horizons]
            if None not in found:
                return found
            return [self._at(0, float(h), "horizons", h) for h in horizons]
        if times is not None:
            return [self._at(1, float(t), "times", t) for t in times]
        if not self._forecast:
            raise ServingError("horizons", "the score has no forecast points yet")
        return self._forecast

    def answer(self, *, horizons: Sequence[float] | None = None,
               times: Sequence[int] | None = None, now_ms: int) -> dict[str, Any]:
        """Everything the endpoint answers: identity, freshness, capacity, the points."""
        out = dict(self._head)
        out["age_s"] = max(0.0, (now_ms - self.score.computed_at) / 1000)
        out["stale"] = now_ms > self.score.valid_until
        out["points"] = self.points(horizons=horizons, times=times)
        return out


def lookup(score: LoadScore, *, horizons: Sequence[float] | None = None,
           times: Sequence[int] | None = None) -> list[Point]:
    """:meth:`Curve.points` of ``score`` (dicts)."""
    return Curve(score).points(horizons=horizons, times=times)


def answer(score: LoadScore, *, horizons: Sequence[float] | None = None,
           times: Sequence[int] | None = None, now_ms: int) -> dict[str, Any]:
    """:meth:`Curve.answer` of ``score`` (build a :class:`Curve` to answer many)."""
    return Curve(score).answer(horizons=horizons, times=times, now_ms=now_ms)
