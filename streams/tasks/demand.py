"""Task arrivals as telemetry, and the forecasts of them, for scaling the swarm ahead of
demand.

Every ``tasks.telemetry_interval_seconds`` the API publishes, per task type, one
EndpointTelemetry window (endpoint ``tasks/<type>``, api ``tasks``) with the tasks *this
replica* accepted in the window as ``request_count`` and the measured service time as its
latency, through the SDK's :class:`~streams.sdk.TelemetryProducer`: the forecasting
processors forecast task arrivals like any endpoint's requests. The API reads their
LoadScores back (``load-scores``), and ``/v1/tasks/forecast`` takes the forecast arrival
rate at the lead time from them (the measured rate when there is no score yet).
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from schemas.records import EndpointTelemetry

log = logging.getLogger(__name__)

API = "tasks"


def endpoint_of(task_type: str) -> str:
    """The telemetry endpoint of a task type."""
    return f"{API}/{task_type}"


class DemandTelemetry:
    """Arrivals counted per type since the last window, and the latest forecast per type."""

    def __init__(self, region: str, agent_id: str | None = None) -> None:
        self.region = region
        self.agent_id = agent_id or f"tasks-{socket.gethostname()}"
        self.arrivals: Counter[str] = Counter()
        self.window_start = int(time.time() * 1000)
        self.scores: dict[str, dict[str, Any]] = {}  # task type -> latest LoadScore

    def arrived(self, task_type: str) -> None:
        self.arrivals[task_type] += 1

    def windows(self, task_types: list[str], service_s: Mapping[str, float | None],
                running: Mapping[str, int], now_ms: int) -> list[EndpointTelemetry]:
        """One window per type since the last call (empty types too: zero is demand)."""
        start, self.window_start = self.window_start, now_ms
        counts, self.arrivals = self.arrivals, Counter()
        out: list[EndpointTelemetry] = []
        for t in task_types:
            ms = 1000 * (service_s.get(t) or 0.0)
            out.append({
                "endpoint_id": endpoint_of(t), "region": self.region, "api": API,
                "agent_id": self.agent_id, "window_start": start,
                "window_end": max(now_ms, start + 1), "interval_ms": max(1, now_ms - start),
                "request_count": counts.get(t, 0), "errors_4xx": 0, "errors_5xx": 0,
                "errors_connect": 0, "latency_p50_ms": ms, "latency_p95_ms": ms,
                "latency_p99_ms": ms, "latency_max_ms": ms, "cpu_percent": 0.0,
                "memory_percent": 0.0, "net_in_bytes": 0, "net_out_bytes": 0,
                "in_flight": running.get(t, 0),
            })
        return out

    def score(self, record: Mapping[str, Any]) -> None:
        """Keep a LoadScore of a task type's endpoint (others are not ours)."""
        endpoint = str(record.get("endpoint_id", ""))
        if record.get("api") == API and endpoint.startswith(f"{API}/"):
            task_type = endpoint[len(API) + 1:]
            old = self.scores.get(task_type)
            if old is None or record["computed_at"] >= old["computed_at"]:
                self.scores[task_type] = dict(record)

    def forecast_rate(self, task_type: str, at_ms: int) -> tuple[float, int] | None:
        """``(forecast arrivals per second, when the forecast was made)`` at ``at_ms``: the
        forecast point nearest to it of the latest valid score; None without one."""
        s = self.scores.get(task_type)
        if s is None or s["valid_until"] < int(time.time() * 1000) or not s["forecast"]:
            return None
        point = min(s["forecast"], key=lambda p: abs(p["at"] - at_ms))
        return max(0.0, float(point["mean"])), int(s["computed_at"])
