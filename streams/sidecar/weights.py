"""The weight table: per API, the latest score of each endpoint and the weights they give.

Pure: takes LoadScore / Anomaly dicts and "now", returns :class:`WeightChange` values.
Weights come from ``processors.scoring`` (relative weights, best endpoint = 1, and HAProxy
integers 0-256 where a positive score never rounds to 0).

An API's table is *fresh* while at least one of its endpoints has a score whose
``valid_until`` is in the future; an endpoint without a fresh score then gets the mean
fresh score (neither starved nor flooded). With no fresh score the table is *stale*:
weights go back to equal and the router switches to its fallback policy.

>>> t = WeightTable({"orders": ["a", "b"]})
>>> change = t.apply_scores([{"endpoint_id": "a", "api": "orders", "score": 0.8,
...     "valid_until": 2000, "computed_at": 1000, "predicted_utilization": 0.5}], now_ms=1000)
>>> [(c.api, c.weights, c.stale) for c in change]
[('orders', {'a': 1.0, 'b': 1.0}, False)]
>>> t.stale_changes(now_ms=2001)[0].stale
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from processors.scoring import haproxy_weights, prioritize, routing_weights


@dataclass(frozen=True)
class ScoreEntry:
    """What the table keeps of one LoadScore."""

    score: float
    valid_until_ms: int
    computed_at_ms: int
    predicted_utilization: float


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


class WeightTable:
    """Weights per API from the scores; see the module docstring."""

    def __init__(
        self,
        apis: Mapping[str, Iterable[str]],
        *,
        anomaly_damping: float = 0.5,
        anomaly_hold_ms: int = 30_000,
    ) -> None:
        self._apis = {api: _Api(list(eps)) for api, eps in apis.items()}
        self._api_of = {e: api for api, a in self._apis.items() for e in a.endpoints}
        self.anomaly_damping = anomaly_damping
        self.anomaly_hold_ms = anomaly_hold_ms
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
            a.scores[r["endpoint_id"]] = ScoreEntry(
                score if math.isfinite(score) else 0.0,
                int(r["valid_until"]),
                int(r["computed_at"]),
                float(r.get("predicted_utilization", 0.0)),
            )
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

    def overload(self, api: str, now_ms: int) -> float:
        """The lowest fresh predicted utilization of the API's endpoints (0 without
        fresh scores or when an endpoint has no fresh score: it may have room)."""
        a = self._apis[api]
        fresh = [s for s in a.scores.values() if s.valid_until_ms >= now_ms]
        if not fresh or len(fresh) < len(a.endpoints):
            return 0.0
        return min(s.predicted_utilization for s in fresh)

    def _recompute(self, api: str, now_ms: int) -> WeightChange | None:
        a = self._apis[api]
        fresh = self.fresh_scores(api, now_ms)
        stale = not fresh
        if stale:
            effective = dict.fromkeys(a.endpoints, 1.0)
        else:
            mean = sum(fresh.values()) / len(fresh)
            effective = {}
            for e in a.endpoints:
                s = fresh.get(e, mean)
                if a.anomaly_until.get(e, 0) > now_ms:
                    s *= self.anomaly_damping
                effective[e] = s
        hap = haproxy_weights(effective)
        if hap == a.haproxy and stale == a.stale:
            return None
        previous = a.weights
        a.weights = routing_weights(effective)
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
                "scores": {
                    e: {
                        "score": s.score,
                        "valid_until": s.valid_until_ms,
                        "computed_at": s.computed_at_ms,
                        "predicted_utilization": s.predicted_utilization,
                        "fresh": s.valid_until_ms >= now_ms,
                    }
                    for e, s in a.scores.items()
                },
                "score_order": self.score_order(api, now_ms),
            }
        return out
