"""Routing weights from LoadScore records: what the sidecar's weight table
(:mod:`streams.sidecar.weights`) turns scores into.

A score (:func:`processors.scoring.compute_score`) says how much headroom an endpoint has;
this module splits a score record into own load, measured health and the explicit rest
(:func:`split_score`), weighs endpoints by capacity x health (:func:`capacity_weights`),
rate-limits the change (:func:`limit_change`), ranks endpoints (:func:`prioritize`) and
turns relative weights into data-plane weights (:func:`routing_weights`,
:func:`haproxy_weights`). Pure: no I/O.

>>> routing_weights({"a": 2.0, "b": 1.0})
{'a': 1.0, 'b': 0.5}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from processors.scoring import ScorePolicy

__all__ = [
    "ScoreParts",
    "capacity_weights",
    "haproxy_weights",
    "limit_change",
    "prioritize",
    "prioritize_by_api",
    "routing_weights",
    "split_score",
]


def _clip01(x: float) -> float:
    return 0.0 if not math.isfinite(x) or x < 0 else min(x, 1.0)


def _nonneg(x: float) -> float:
    return x if math.isfinite(x) and x > 0 else 0.0


def _get(s: Any, key: str) -> Any:
    return s[key] if isinstance(s, Mapping) else getattr(s, key)


def prioritize(scores: Iterable[Any], now_ms: int | None = None) -> list[str]:
    """Endpoint ids of one API, best first: descending score, ties by endpoint id.

    ``scores`` are LoadScore dicts (or objects with ``endpoint_id`` and ``score``).  With
    ``now_ms``, scores past ``valid_until`` go after every fresh one.

    >>> prioritize([{"endpoint_id": "b", "score": 0.5}, {"endpoint_id": "a", "score": 0.5},
    ...             {"endpoint_id": "c", "score": 0.9}])
    ['c', 'a', 'b']
    """

    def key(s: Any) -> tuple[bool, float, str]:
        stale = False
        if now_ms is not None:
            vu = _get(s, "valid_until")
            stale = vu is not None and vu < now_ms
        sc = float(_get(s, "score"))
        return (stale, -(sc if math.isfinite(sc) else 0.0), str(_get(s, "endpoint_id")))

    return [str(_get(s, "endpoint_id")) for s in sorted(scores, key=key)]


def prioritize_by_api(scores: Iterable[Any], now_ms: int | None = None) -> dict[str, list[str]]:
    """:func:`prioritize` for every API present in ``scores``."""
    groups: dict[str, list[Any]] = {}
    for s in scores:
        groups.setdefault(str(_get(s, "api")), []).append(s)
    return {api: prioritize(group, now_ms) for api, group in sorted(groups.items())}


def routing_weights(values: Mapping[str, float]) -> dict[str, float]:
    """Relative weights in [0, 1] (the largest value gets 1) from non-negative values
    (scores, or capacity x health in rps).  If every value is 0 all get 1: a sidecar must
    never end up with "no routing".

    >>> routing_weights({"a": 0.8, "b": 0.2, "c": 0.0})
    {'a': 1.0, 'b': 0.25, 'c': 0.0}
    >>> routing_weights({"big": 110.0, "small": 36.7})["small"] < 0.34
    True
    """
    clean = {k: _nonneg(v) for k, v in values.items()}
    top = max(clean.values(), default=0.0)
    if top <= 0:
        return dict.fromkeys(clean, 1.0)
    return {k: v / top for k, v in clean.items()}


def haproxy_weights(values: Mapping[str, float], max_weight: int = 256) -> dict[str, int]:
    """HAProxy server weights 0..``max_weight``; a positive value never rounds to 0.

    >>> haproxy_weights({"a": 0.9, "b": 0.0001, "c": 0.0})
    {'a': 256, 'b': 1, 'c': 0}
    """
    rel = routing_weights(values)
    return {
        k: 0 if v <= 0 else min(max_weight, max(1, round(v * max_weight)))
        for k, v in rel.items()
    }


# -- capacity-proportional routing -------------------------------------------------------
#
# A score says how much headroom an endpoint has *at the share of traffic it has now*; its
# load factor (1 - u^2) is a consequence of the weights themselves.  Weights proportional to
# scores therefore chase their own tail: under load every score heads for 0, the relative
# differences blow up, traffic herds onto the endpoint that looked best a moment ago and the
# herd moves on when its queue fills.  And at moderate load 1 - u^2 hardly differs between
# a big and a small endpoint, so a 3:1 capacity ratio got about 1:1 traffic.
#
# What a router needs instead is the share of the API's demand each endpoint can absorb:
# weight = capacity x health, with health taken from what was measured (errors, latency,
# anomaly) and never below a floor, rate-limited between score intervals (health is partly
# a consequence of the weights too), and whatever the score says beyond load and health
# (an operator's override, a penalty the fields do not show) applied as is.  Whether the
# API as a whole is over capacity is a question for the sum: predicted demand of all its
# endpoints against their total capacity (shedding, mirrors).


@dataclass(frozen=True, slots=True)
class ScoreParts:
    """A LoadScore record split into what a router needs (see :func:`split_score`)."""

    load: float  # the own-load factor 1 - u^2 (u as in processors.scoring.compute_score)
    health: float  # errors x latency x anomaly, from the measured fields, in [0, 1]
    explicit: float  # what load and health do not explain, in [0, 1]; 1 for scorer output
    demand_rps: float | None  # max(current rps, peak forecast over the horizon); None: no
    #                             capacity in the record to turn utilization into rps
    next_demand_rps: float | None  # max(current rps, forecast of the next step)
    capacity_rps: float | None  # the record's capacity (None when absent or not > 0)
    capacity_source: str | None
    upper_demand_rps: float | None = None  # max(current, the forecast's upper band peak)


def _field(record: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    v = record.get(key)
    try:
        x = float(v) if v is not None else default
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def split_score(record: Mapping[str, Any], policy: ScorePolicy | None = None,
                min_known: float = 0.02) -> ScoreParts:
    """Split a LoadScore dict into own load, measured health and the explicit rest.

    ``health`` is recomputed from ``error_rate``, ``latency_p99_ms`` and ``anomaly_score``
    with the formula of :func:`processors.scoring.compute_score`; ``load`` from ``current_rps``,
    ``predicted_utilization`` and the forecast's upper band.  ``explicit`` = score /
    (load x health): about 1 for a score the scorer computed (0.5 when it also applied the
    anomaly penalty), the score itself for a hand-set score of a healthy, idle endpoint.
    When load x health is under ``min_known`` the score cannot say more: explicit = 1.
    Missing fields (an admin's override carries only the score) count as idle and healthy.

    >>> from processors.forecasting import ForecastPoint
    >>> from processors.scoring import CapacityEstimate, load_score_record
    >>> rec = load_score_record(endpoint_id="e", api="a", region="r", computed_at=0.0,
    ...     step_seconds=10, forecast=[ForecastPoint(1, 10.0, 90.0, 80.0, 100.0)],
    ...     capacity=CapacityEstimate(100.0, "CONFIGURED"), current_rps=95.0,
    ...     latency_p99_ms=1000.0, error_rate=0.0)
    >>> p = split_score(rec)
    >>> round(rec["score"], 3), round(p.health, 2), round(p.explicit, 2), p.demand_rps
    (0.049, 0.5, 1.0, 95.0)
    >>> q = split_score({"endpoint_id": "e", "score": 0.3})
    >>> q.load, q.health, q.explicit, q.demand_rps
    (1.0, 1.0, 0.3, None)
    """
    pol = policy or ScorePolicy()
    cap = _field(record, "capacity_rps")
    known_cap = cap > 0
    u_pred = _nonneg(_field(record, "predicted_utilization"))
    u_now = _nonneg(_field(record, "current_rps")) / cap if known_cap else 0.0
    u_risk = u_pred
    points = [p for p in record.get("forecast") or () if isinstance(p, Mapping)]
    if known_cap:
        u_risk = max(u_pred, max((_nonneg(_field(p, "upper")) for p in points), default=0.0)
                     / cap)
    u = max(u_now, u_pred + pol.risk_weight * (u_risk - u_pred))
    load = _clip01(1.0 - u * u)
    err = _clip01(_field(record, "error_rate"))
    p99 = _nonneg(_field(record, "latency_p99_ms"))
    errors = math.exp(-err / pol.error_scale) if pol.error_scale > 0 else 1.0
    latency = 1.0 if p99 <= pol.latency_slo_ms else pol.latency_slo_ms / p99
    anomaly = _clip01(1.0 - pol.anomaly_weight * _clip01(_field(record, "anomaly_score")))
    health = _clip01(errors * latency * anomaly)
    known = load * health
    score = _clip01(_field(record, "score"))
    explicit = _clip01(score / known) if known >= min_known else 1.0
    current = _nonneg(_field(record, "current_rps"))
    demand = next_demand = None
    if known_cap:
        demand = max(current, u_pred * cap)
        first = min(points, key=lambda p: _field(p, "horizon"), default=None)
        next_demand = max(current, _nonneg(_field(first, "mean"))) if first else demand
    source = record.get("capacity_source")
    upper = max(current, u_risk * cap) if known_cap else None
    return ScoreParts(load, health, explicit, demand, next_demand, cap if known_cap else None,
                      str(source) if source is not None else None, upper)


def capacity_weights(
    capacity: Mapping[str, float],
    health: Mapping[str, float],
    explicit: Mapping[str, float] | None = None,
    *,
    health_floor: float = 0.05,
) -> dict[str, float]:
    """Relative weights (largest 1) proportional to capacity x health x explicit.

    Health is floored at ``health_floor``: a live endpoint keeps a trickle (and the data
    that shows it recovered) however bad it looks; only an explicit 0 drains it.

    >>> capacity_weights({"a": 110.0, "b": 37.0}, {"a": 1.0, "b": 1.0})
    {'a': 1.0, 'b': 0.33636363636363636}
    >>> capacity_weights({"a": 100.0, "b": 100.0}, {"a": 1.0, "b": 0.0})
    {'a': 1.0, 'b': 0.05}
    >>> capacity_weights({"a": 100.0, "b": 100.0}, {"a": 1.0, "b": 1.0}, {"b": 0.0})
    {'a': 1.0, 'b': 0.0}
    """
    ex = explicit or {}
    raw = {
        e: _nonneg(c) * max(_clip01(health.get(e, 1.0)), health_floor) * _clip01(ex.get(e, 1.0))
        for e, c in capacity.items()
    }
    return routing_weights(raw)


def limit_change(previous: float, target: float, max_factor: float) -> float:
    """``target``, but at most ``max_factor`` times above or below ``previous`` (both > 0;
    from or to 0 the target is taken as is: a drain or an undrain is a decision, not
    noise).

    >>> [limit_change(100.0, 10.0, 2.0), limit_change(10.0, 100.0, 2.0)]
    [50.0, 20.0]
    >>> limit_change(10.0, 12.0, 2.0), limit_change(10.0, 0.0, 2.0)
    (12.0, 0.0)
    """
    if previous <= 0 or target <= 0:
        return target
    return min(max(target, previous / max_factor), previous * max_factor)
