"""Typed views of loadcast values for users' code.

The codec works on plain dicts (fast); these types are what the SDK hands to users.
``tests/test_codec.py`` checks that their fields match the ``.avsc`` files.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, NotRequired, TypedDict


class EndpointTelemetry(TypedDict):
    """One endpoint-window, as produced to the telemetry topic (times in epoch ms)."""

    endpoint_id: str
    region: str
    api: str
    agent_id: str
    window_start: int
    window_end: int
    interval_ms: int
    request_count: int
    errors_4xx: int
    errors_5xx: int
    errors_connect: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    cpu_percent: float
    memory_percent: float
    net_in_bytes: int
    net_out_bytes: int
    in_flight: NotRequired[int]
    errors_timeout: NotRequired[int]
    distinct_clients: NotRequired[int | None]
    attributes: NotRequired[dict[str, str]]


def _from(cls: Any, record: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in record.items() if k in names})


@dataclass(frozen=True)
class ForecastPoint:
    """Predicted requests/s ``horizon`` steps ahead, at ``at`` (epoch ms), with a 90 % band."""

    horizon: int
    at: int
    mean: float
    lower: float
    upper: float


@dataclass(frozen=True)
class LoadScore:
    """How much more traffic an endpoint can take (score in [0, 1], higher = send more)."""

    endpoint_id: str
    api: str
    region: str
    computed_at: int
    valid_until: int
    score: float
    capacity_rps: float
    capacity_source: str
    current_rps: float
    predicted_utilization: float
    latency_p99_ms: float
    error_rate: float
    anomaly_score: float
    step_seconds: int
    forecast: tuple[ForecastPoint, ...]
    model: str = "default"
    reasons: tuple[str, ...] = ()

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LoadScore:
        r = dict(record)
        r["forecast"] = tuple(
            _from(ForecastPoint, p) for p in r.get("forecast", ())
        )
        r["reasons"] = tuple(r.get("reasons", ()))
        score: LoadScore = _from(cls, r)
        return score

    def is_stale(self, now_ms: int | None = None) -> bool:
        """True once ``valid_until`` has passed."""
        now = now_ms if now_ms is not None else round(datetime.now(UTC).timestamp() * 1000)
        return now > self.valid_until


@dataclass(frozen=True)
class RoutingDecision:
    """A sidecar's weight-table change (kind WEIGHTS) or a sampled request (REQUEST)."""

    sidecar_id: str
    region: str
    api: str
    at: int
    kind: str
    policy: str
    stale: bool
    weights: dict[str, float]
    previous_weights: dict[str, float]
    scores: dict[str, float]
    endpoint_id: str | None = None
    status: int | None = None
    latency_ms: float | None = None
    attempts: int = 1
    dynamic_routing: bool = True

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RoutingDecision:
        decision: RoutingDecision = _from(cls, record)
        return decision
