"""Synthetic records of the benchmarks and tests."""

from __future__ import annotations

from typing import Any

INTERVAL_MS = 60_000  # the agent's window


def window(endpoint: str, i: int, base_ms: int, *, api: str = "orders",
           n: int | None = None, agent_id: str = "faults") -> dict[str, Any]:
    """The i-th 60-s EndpointTelemetry window of ``endpoint`` from ``base_ms``, with ``n``
    requests (default: a fixed pattern in ``i``) and latencies that grow with ``n``."""
    n = 50 + (i * 37) % 200 if n is None else n
    ws = base_ms + i * INTERVAL_MS
    return {
        "endpoint_id": endpoint, "region": "eu", "api": api, "agent_id": agent_id,
        "window_start": ws, "window_end": ws + INTERVAL_MS, "interval_ms": INTERVAL_MS,
        "request_count": n, "errors_4xx": 0, "errors_5xx": n // 100, "errors_connect": 0,
        "latency_p50_ms": 20.0 + n / 10, "latency_p95_ms": 40.0 + n / 5,
        "latency_p99_ms": 60.0 + n / 4, "latency_max_ms": 90.0 + n / 3,
        "cpu_percent": 30.0, "memory_percent": 50.0, "net_in_bytes": 1000 * n,
        "net_out_bytes": 3000 * n,
    }
