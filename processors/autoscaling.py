"""Predictive autoscaling: what a KEDA ``ScaledObject`` asks (its trigger metadata) and the
forecast demand that answers it. Pure: values in, values out (the gRPC servicer is
:mod:`streams.api.scaler`).

The metric is the forecast demand (requests/s, summed over the endpoints of an api, in one
region or all) at ``now + leadSeconds``; KEDA's target is ``targetPerReplica``, so the HPA
asks for ``ceil(demand / targetPerReplica)`` replicas *before* the demand arrives.

Which forecast point: the first point at or after ``now + leadSeconds`` (forecast points
are ``step_seconds`` apart, so this looks ahead by at most one step more than asked: it
scales up a little early, never late); past the last point, the last point. No
interpolation: the bands of two horizons are not linear in between, and the point is a
value the model did forecast.

A stale score (past its ``valid_until``), or one without forecast points, contributes its
current rate (``current_rps``) instead, and is named in :attr:`Demand.stale` so the caller
says so in its log: never a silent scale on an old forecast.

>>> from schemas.records import ForecastPoint, LoadScore
>>> q = parse_metadata({"api": "orders", "leadSeconds": "120", "targetPerReplica": "50",
...                     "band": "upper", "scalerAddress": "loadcast-api:8091"})
>>> q.api, q.region, q.lead_seconds, q.target_per_replica, q.band
('orders', None, 120.0, 50.0, 'upper')
>>> pts = tuple(ForecastPoint(h, 60_000 * h, 100.0 * h, 90.0 * h, 110.0 * h)
...             for h in (1, 2, 3))
>>> s = LoadScore("e1", "orders", "eu", 0, 200_000, 0.5, 500.0, "CONFIGURED", 80.0, 0.4,
...               12.0, 0.0, 0.0, 60, pts)
>>> d = demand_at([s], q, now_ms=30_000)   # now + 120 s = 150 s -> the point at 180 s
>>> d.rps, d.stale, d.at
(330.0, (), 150000)
>>> demand_at([s], q, now_ms=250_000).stale  # past valid_until: its current rate
('e1',)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from schemas.records import ForecastPoint, LoadScore

Band = Literal["mean", "upper"]
BANDS: tuple[Band, ...] = ("mean", "upper")
MAX_LEAD_SECONDS = 7 * 86_400.0  # a week: beyond any forecast horizon loadcast keeps
KEYS = ("api", "region", "leadSeconds", "targetPerReplica", "band", "activationThreshold")
_NORMALISED = {k.lower(): k for k in KEYS}


class MetadataError(ValueError):
    """A ScaledObject's trigger metadata is missing a key or has a bad value."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"metadata {key!r}: {message}")
        self.key = key


@dataclass(frozen=True)
class ScalerQuery:
    """One trigger: scale on the ``band`` forecast of ``api`` (in ``region``, or all
    regions) ``lead_seconds`` ahead, ``target_per_replica`` requests/s per replica."""

    api: str
    region: str | None
    lead_seconds: float
    target_per_replica: float
    band: Band = "mean"
    activation_threshold: float = 0.0

    @property
    def metric_name(self) -> str:
        """A stable metric name (KEDA prefixes ``sN-``; HPA wants lowercase and dashes)."""
        raw = (f"loadcast-{self.api}-{self.region or 'all'}-{self.band}-"
               f"{self.lead_seconds:g}s")
        return re.sub(r"[^a-z0-9.-]+", "-", raw.lower()).strip("-")[:200]


@dataclass(frozen=True)
class Demand:
    """Forecast demand (requests/s) at ``at`` (epoch ms), summed over ``endpoints``;
    ``stale`` names the endpoints counted at their current rate instead."""

    rps: float
    at: int
    endpoints: int
    stale: tuple[str, ...]

    def is_active(self, query: ScalerQuery) -> bool:
        """KEDA's activity: demand above the activation threshold."""
        return self.rps > query.activation_threshold


def _number(meta: Mapping[str, str], key: str, *, default: float | None,
            low: float, low_inclusive: bool, high: float = math.inf) -> float:
    raw = meta.get(key)
    if raw is None or raw.strip() == "":
        if default is None:
            raise MetadataError(key, "missing (required)")
        return default
    try:
        value = float(raw)
    except ValueError:
        raise MetadataError(key, f"not a number: {raw!r}") from None
    too_low = value < low if low_inclusive else value <= low
    if not math.isfinite(value) or too_low or value > high:
        bound = ">=" if low_inclusive else ">"
        raise MetadataError(key, f"{raw!r} is out of range ({bound} {low:g}, <= {high:g})")
    return value


def parse_metadata(meta: Mapping[str, str]) -> ScalerQuery:
    """The query of a trigger's metadata (KEDA passes all of it, ``scalerAddress`` too:
    other keys are ignored, but a misspelt key of ours is an error, not a silent default).

    Raises :class:`MetadataError` naming the key.
    """
    for key in meta:
        ours = _NORMALISED.get(key.lower().replace("_", "").replace("-", ""))
        if ours is not None and ours != key:
            raise MetadataError(key, f"unknown key; did you mean {ours!r}?")
    api = (meta.get("api") or "").strip()
    if not api:
        raise MetadataError("api", "missing (required)")
    region = (meta.get("region") or "").strip() or None
    band = (meta.get("band") or "mean").strip().lower()
    if band not in BANDS:
        raise MetadataError("band", f"{band!r} is not one of {', '.join(BANDS)}")
    return ScalerQuery(
        api=api, region=region,
        lead_seconds=_number(meta, "leadSeconds", default=None, low=0, low_inclusive=True,
                             high=MAX_LEAD_SECONDS),
        target_per_replica=_number(meta, "targetPerReplica", default=None, low=0,
                                   low_inclusive=False),
        band="upper" if band == "upper" else "mean",
        activation_threshold=_number(meta, "activationThreshold", default=0.0, low=0,
                                     low_inclusive=True),
    )


def point_at(forecast: Iterable[ForecastPoint], at_ms: int) -> ForecastPoint | None:
    """The first forecast point at or after ``at_ms``; past the last one, the last one."""
    last = None
    for p in sorted(forecast, key=lambda p: p.at):
        if p.at >= at_ms:
            return p
        last = p
    return last


def demand_at(scores: Iterable[LoadScore], query: ScalerQuery, now_ms: int) -> Demand:
    """The forecast demand of ``scores`` (one per endpoint) ``query.lead_seconds`` after
    ``now_ms``, in ``query.band``; stale or forecast-less scores count their current rate."""
    at = now_ms + round(query.lead_seconds * 1000)
    total, n, stale = 0.0, 0, []
    for s in scores:
        n += 1
        p = None if s.is_stale(now_ms) else point_at(s.forecast, at)
        if p is None:
            stale.append(s.endpoint_id)
            total += max(0.0, s.current_rps)
        else:
            total += max(0.0, p.upper if query.band == "upper" else p.mean)
    return Demand(rps=total, at=at, endpoints=n, stale=tuple(stale))
