"""The weight table: per API, the latest score of each endpoint and the weights they give.

Pure: takes LoadScore / Anomaly dicts and "now", returns :class:`WeightChange` values.

Weights are **capacity x health**, not scores (``streams.sidecar.routing_weights`` says
why: a score's own-load factor is a consequence of the weights, and weights proportional
to it herd):

- capacity: each endpoint's capacity has a source and a confidence (:class:`Capacity`):
  a LEARNED knee the processor has reported ``learned_confirm`` scores in a row (within 2x
  of each other) is *confidently learned* and used first; else the upstream's configured
  ``capacity_rps`` hint; else the record's CONFIGURED capacity; else none. A DEFAULT guess
  (or a knee seen only once or twice) is never used: it would shed or cap traffic on a
  number nobody measured. Endpoints without a capacity get the mean of the known ones;
  with none known every endpoint gets the same (weights are then health x explicit only:
  the reactive signal);
- health: errors x latency x anomaly from the record's measured fields, floored (a live
  endpoint is never weighted 0) and, times capacity, rate-limited to ``max_step`` x per
  ``step_ms`` so the loop cannot oscillate;
- explicit: what the score says beyond load and health (an operator's override, the
  anomaly penalty) is applied as is, at once; an explicit 0 drains the endpoint.

:meth:`WeightTable.total_capacity` is the API's capacity for shedding: the sum over its
live endpoints, or None unless every one of them has a configured or confidently learned
capacity (the router then sheds by the offered rate it counts itself, ``router.py``).
:meth:`WeightTable.overload` (predicted demand over that capacity, 0 when it is unknown) is
for what needs lead time.

An API's table is *fresh* while at least one of its endpoints has a score whose
``valid_until`` is in the future; an endpoint without a fresh score then gets the mean
fresh health (neither starved nor flooded). With no fresh score the table is *stale*:
weights go back to equal and the router switches to its fallback policy.

>>> t = WeightTable({"orders": ["a", "b"]})
>>> change = t.apply_scores([{"endpoint_id": "a", "api": "orders", "score": 0.8,
...     "valid_until": 2000, "computed_at": 1000, "predicted_utilization": 0.5}], now_ms=1000)
>>> [(c.api, c.weights, c.stale) for c in change]
[('orders', {'a': 1.0, 'b': 1.0}, False)]
>>> t.stale_changes(now_ms=2001)[0].stale
True
>>> t = WeightTable({"api": ["big", "small"]}, capacities={"big": 300.0, "small": 100.0})
>>> ch = t.apply_scores([{"endpoint_id": e, "api": "api", "score": 0.2, "valid_until": 9000,
...     "computed_at": 0, "predicted_utilization": 0.9} for e in ("big", "small")], now_ms=0)
>>> {e: round(w, 3) for e, w in ch[0].weights.items()}  # 3:1, whatever the scores' load
{'big': 1.0, 'small': 0.333}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from streams.sidecar.routing_weights import (
    ScoreParts,
    haproxy_weights,
    limit_change,
    prioritize,
    routing_weights,
    split_score,
)


@dataclass(frozen=True)
class ScoreEntry:
    """What the table keeps of one LoadScore."""

    score: float
    valid_until_ms: int
    computed_at_ms: int
    predicted_utilization: float
    parts: ScoreParts | None = None  # load / health / explicit split of the record


CAPACITY_SOURCES = ("configured", "learned", "none")
LEARNED_CONFIRM = 3  # LEARNED scores in a row (within 2x) before a knee is trusted


@dataclass(frozen=True)
class Capacity:
    """An endpoint's capacity as the sidecar uses it: ``rps`` (None: unknown), where it
    comes from (``configured``, ``learned`` or ``none``), how sure we are (0..1) and
    whether weights and shedding use it (configured, or learned with confidence 1)."""

    rps: float | None
    source: str
    confidence: float

    @property
    def usable(self) -> bool:
        return self.rps is not None and self.source != "none" and self.confidence >= 1.0


@dataclass(frozen=True)
class WeightChange:
    """One API's weights changed (or went stale / fresh again)."""

    api: str
    weights: dict[str, float]
    previous_weights: dict[str, float]
    haproxy: dict[str, int]
    scores: dict[str, float]
    stale: bool


@dataclass
class _Api:
    endpoints: list[str]
    scores: dict[str, ScoreEntry] = field(default_factory=dict)
    anomaly_until: dict[str, int] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    haproxy: dict[str, int] = field(default_factory=dict)
    stale: bool = True
    # capacity x health per endpoint (rps) as rate-limited so far, and when
    measured: dict[str, float] = field(default_factory=dict)
    measured_at_ms: int = 0
    # LEARNED knees reported in a row per endpoint, and the last one
    learned_n: dict[str, int] = field(default_factory=dict)
    learned_rps: dict[str, float] = field(default_factory=dict)
    known: frozenset[str] = frozenset()  # endpoints with a usable capacity, last time


class WeightTable:
    """Weights per API from the scores; see the module docstring."""

    def __init__(
        self,
        apis: Mapping[str, Iterable[str]],
        *,
        anomaly_damping: float = 0.5,
        anomaly_hold_ms: int = 30_000,
        capacities: Mapping[str, float | None] | None = None,
        health_floor: float = 0.05,
        max_step: float = 2.0,
        step_ms: int = 5_000,
        learned_confirm: int = LEARNED_CONFIRM,
    ) -> None:
        """``capacities``: configured capacity hints (rps) per endpoint id; ``health_floor``:
        the least health a live endpoint is weighted with; weights move at most
        ``max_step`` x per ``step_ms`` (the score interval) unless a score drains or
        overrides them explicitly."""
        self._apis = {api: _Api(list(eps)) for api, eps in apis.items()}
        self._api_of = {e: api for api, a in self._apis.items() for e in a.endpoints}
        self.anomaly_damping = anomaly_damping
        self.anomaly_hold_ms = anomaly_hold_ms
        self.hints = {e: float(c) for e, c in (capacities or {}).items()
                      if c is not None and math.isfinite(c) and c > 0}
        self.health_floor = health_floor
        self.max_step = max_step
        self.step_ms = step_ms
        self.learned_confirm = max(1, learned_confirm)
        self.unknown = 0  # scores for endpoints this sidecar does not route to
        for a in self._apis.values():
            a.weights = dict.fromkeys(a.endpoints, 1.0)
            a.haproxy = dict.fromkeys(a.endpoints, 256)

    @property
    def apis(self) -> list[str]:
        return list(self._apis)

    def api_of(self, endpoint_id: str) -> str | None:
        return self._api_of.get(endpoint_id)

    def weights(self, api: str) -> dict[str, float]:
        return dict(self._apis[api].weights)

    def haproxy(self, api: str) -> dict[str, int]:
        return dict(self._apis[api].haproxy)

    def is_stale(self, api: str) -> bool:
        return self._apis[api].stale

    def apply_scores(self, records: Iterable[Mapping[str, Any]], now_ms: int) -> list[WeightChange]:
        """Take LoadScore dicts (newest per endpoint wins); return the APIs that changed."""
        touched: set[str] = set()
        for r in records:
            api = self._api_of.get(r["endpoint_id"])
            if api is None:
                self.unknown += 1
                continue
            a = self._apis[api]
            prev = a.scores.get(r["endpoint_id"])
            if prev is not None and r["computed_at"] < prev.computed_at_ms:
                continue  # an older score arriving late
            score = float(r["score"])
            parts = split_score(r)
            a.scores[r["endpoint_id"]] = ScoreEntry(
                score if math.isfinite(score) else 0.0,
                int(r["valid_until"]),
                int(r["computed_at"]),
                float(r.get("predicted_utilization", 0.0)),
                parts,
            )
            _learn(a, r["endpoint_id"], parts)
            touched.add(api)
        return [c for api in touched if (c := self._recompute(api, now_ms)) is not None]

    def apply_anomalies(
        self, records: Iterable[Mapping[str, Any]], now_ms: int
    ) -> list[WeightChange]:
        """Anomaly dicts: an endpoint flagged (score >= threshold) has its weight damped
        for ``anomaly_hold_ms``."""
        touched: set[str] = set()
        for r in records:
            api = self._api_of.get(r["endpoint_id"])
            if api is None or float(r["score"]) < float(r["threshold"]):
                continue
            self._apis[api].anomaly_until[r["endpoint_id"]] = now_ms + self.anomaly_hold_ms
            touched.add(api)
        return [c for api in touched if (c := self._recompute(api, now_ms)) is not None]

    def stale_changes(self, now_ms: int) -> list[WeightChange]:
        """Recompute every API (scores expire, anomalies end); return the changes."""
        return [c for api in self._apis if (c := self._recompute(api, now_ms)) is not None]

    def fresh_scores(self, api: str, now_ms: int) -> dict[str, float]:
        a = self._apis[api]
        return {e: s.score for e, s in a.scores.items() if s.valid_until_ms >= now_ms}

    def score_order(self, api: str, now_ms: int) -> list[str]:
        """Endpoint ids best first (fresh scores before stale, by score)."""
        a = self._apis[api]
        recs = [
            {"endpoint_id": e, "score": s.score, "valid_until": s.valid_until_ms}
            for e, s in a.scores.items()
        ]
        ranked = prioritize(recs, now_ms)
        return ranked + [e for e in a.endpoints if e not in ranked]

    def capacity(self, api: str, endpoint_id: str) -> Capacity:
        """The capacity of one endpoint with its source and confidence (module docstring)."""
        a = self._apis[api]
        s = a.scores.get(endpoint_id)
        p = s.parts if s is not None else None
        n = a.learned_n.get(endpoint_id, 0)
        learned = None
        if n:
            learned = Capacity(a.learned_rps[endpoint_id], "learned",
                               min(1.0, n / self.learned_confirm))
            if learned.usable:
                return learned
        if endpoint_id in self.hints:
            return Capacity(self.hints[endpoint_id], "configured", 1.0)
        if p is not None and p.capacity_source == "CONFIGURED" and p.capacity_rps:
            return Capacity(p.capacity_rps, "configured", 1.0)
        return learned or Capacity(None, "none", 0.0)

    def capacity_view(self, api: str) -> dict[str, Capacity]:
        return {e: self.capacity(api, e) for e in self._apis[api].endpoints}

    def capacity_source(self, api: str) -> str:
        """``none`` (no usable capacity: no shedding, weights by health only),
        ``configured``, ``learned``, or ``mixed``; ``partial:...`` when some endpoints
        have none."""
        caps = self.capacity_view(api).values()
        used = {c.source for c in caps if c.usable}
        if not used:
            return "none"
        src = used.pop() if len(used) == 1 else "mixed"
        return src if all(c.usable for c in caps) else f"partial:{src}"

    def capacities(self, api: str) -> dict[str, float]:
        """The capacity (rps) each endpoint is weighted by: its usable capacity, else the
        mean of the usable ones, else 1.0 for all (equal: weights by health only)."""
        a = self._apis[api]
        view = self.capacity_view(api)
        known = {e: c.rps for e, c in view.items() if c.usable and c.rps is not None}
        guess = sum(known.values()) / len(known) if known else 1.0
        return {e: known.get(e, guess) for e in a.endpoints}

    def total_capacity(self, api: str, now_ms: int) -> float | None:
        """The API's capacity (rps) for shedding: the sum over endpoints not drained by a
        fresh explicit 0; None unless each of them has a usable capacity (a guessed
        capacity must never shed)."""
        a = self._apis[api]
        total = 0.0
        for e in a.endpoints:
            s = a.scores.get(e)
            if s is not None and s.valid_until_ms >= now_ms and s.parts is not None \
                    and s.parts.explicit <= 0:
                continue
            c = self.capacity(api, e)
            if not c.usable or c.rps is None:
                return None
            total += c.rps
        return total if total > 0 else None

    def overload(self, api: str, now_ms: int, horizon: str = "next") -> float:
        """Predicted demand of the whole API over its total capacity (0 without fresh
        scores). ``horizon="next"``: demand in the next model step (what shedding, which
        acts now, should go by); ``"peak"``: the peak over the forecast horizon (for what
        needs lead time, e.g. mirrors); ``"upper"``: the peak of the forecast's upper band
        (what the edge's cache warming and rate limits go by). Endpoints without a fresh
        score add their capacity (they may have room) and no demand; drained endpoints add
        nothing."""
        a = self._apis[api]
        fresh = {e: s for e, s in a.scores.items() if s.valid_until_ms >= now_ms}
        if not fresh or self.total_capacity(api, now_ms) is None:
            return 0.0  # no scores, or a capacity nobody configured or learned: no overload
        return _overload(a.endpoints, fresh, self.capacities(api), horizon)

    def _recompute(self, api: str, now_ms: int) -> WeightChange | None:
        a = self._apis[api]
        fresh = {e: s for e, s in a.scores.items() if s.valid_until_ms >= now_ms}
        stale = not fresh
        if stale:
            effective = dict.fromkeys(a.endpoints, 1.0)
            a.measured = {}  # fresh again later: start from the scores, not from here
        else:
            parts = {e: s.parts or split_score({"score": s.score}) for e, s in fresh.items()}
            mean_h = sum(p.health for p in parts.values()) / len(parts)
            mean_x = sum(p.explicit for p in parts.values()) / len(parts)
            caps = self.capacities(api)
            known = frozenset(e for e, c in self.capacity_view(api).items() if c.usable)
            if known != a.known:  # capacities became known (or unknown): a new scale,
                a.measured = {}   # not a swing to rate-limit
                a.known = known
            target = {
                e: caps[e] * max(parts[e].health if e in parts else mean_h, self.health_floor)
                for e in a.endpoints
            }
            if a.measured:
                dt = max(0, now_ms - a.measured_at_ms) / self.step_ms
                f = self.max_step ** min(dt, 1.0)
                target = {e: limit_change(a.measured.get(e, v), v, f) for e, v in target.items()}
            a.measured, a.measured_at_ms = target, now_ms
            effective = {
                e: target[e] * (parts[e].explicit if e in parts else mean_x)
                * (self.anomaly_damping if a.anomaly_until.get(e, 0) > now_ms else 1.0)
                for e in a.endpoints
            }
        hap = haproxy_weights(effective)
        new = routing_weights(effective)
        if hap == a.haproxy and stale == a.stale:
            return None
        previous = a.weights
        a.weights = new
        a.haproxy = hap
        a.stale = stale
        return WeightChange(
            api=api,
            weights=dict(a.weights),
            previous_weights=dict(previous),
            haproxy=dict(hap),
            scores={e: s.score for e, s in a.scores.items()},
            stale=stale,
        )

    def snapshot(self, now_ms: int) -> dict[str, Any]:
        """A JSON-able view for ``GET /weights``."""
        out: dict[str, Any] = {}
        for api, a in self._apis.items():
            out[api] = {
                "stale": a.stale,
                "weights": dict(a.weights),
                "haproxy_weights": dict(a.haproxy),
                "scores": {e: _entry_view(s, now_ms) for e, s in a.scores.items()},
                "score_order": self.score_order(api, now_ms),
                "capacity_source": self.capacity_source(api),
                "capacity_total_rps": self.total_capacity(api, now_ms),
                "capacity_rps": {e: c.rps for e, c in self.capacity_view(api).items()},
                "capacities": {
                    e: {"rps": c.rps, "source": c.source, "confidence": round(c.confidence, 3),
                        "used": c.usable}
                    for e, c in self.capacity_view(api).items()
                },
                "predicted_overload": self.overload(api, now_ms),
            }
        return out


def _learn(a: _Api, e: str, p: ScoreParts) -> None:
    """Count LEARNED knees in a row (a knee more than 2x off the last starts over)."""
    if p.capacity_source == "LEARNED" and p.capacity_rps:
        last = a.learned_rps.get(e)
        same = last is not None and 0.5 <= p.capacity_rps / last <= 2.0
        a.learned_n[e] = a.learned_n.get(e, 0) + 1 if same else 1
        a.learned_rps[e] = p.capacity_rps
    else:
        a.learned_n.pop(e, None)
        a.learned_rps.pop(e, None)


def _overload(endpoints: list[str], fresh: Mapping[str, ScoreEntry],
              caps: Mapping[str, float], horizon: str) -> float:
    """Demand over capacity (see :meth:`WeightTable.overload`)."""
    demand = 0.0
    capacity = 0.0
    for e in endpoints:
        s = fresh.get(e)
        p = s.parts if s is not None else None
        if p is not None and p.explicit <= 0:
            continue
        capacity += caps[e]
        if s is None:
            continue
        d = None if p is None else p.next_demand_rps if horizon == "next" else \
            p.upper_demand_rps if horizon == "upper" else p.demand_rps
        if d is None:  # no capacity in the record: its utilization of ours
            d = max(0.0, s.predicted_utilization) * caps[e]
        demand += d
    return demand / capacity if capacity > 0 else 0.0


def _entry_view(s: ScoreEntry, now_ms: int) -> dict[str, Any]:
    return {"score": s.score, "valid_until": s.valid_until_ms, "computed_at": s.computed_at_ms,
            "predicted_utilization": s.predicted_utilization, "fresh": s.valid_until_ms >= now_ms}
