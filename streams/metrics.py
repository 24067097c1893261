"""Prometheus metrics of the streams side (edge agent, producers, consumers).

Names follow ``loadcast_<component>_<what>_<unit>``; labels are ``agent`` / ``client``
and ``reason``. Every process serves them on ``/metrics`` (``serve_metrics``).
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, start_http_server

AGENT_REQUESTS = Counter(
    "loadcast_agent_requests_total", "Requests recorded by the edge agent", ["agent"]
)
AGENT_REJECTED = Counter(
    "loadcast_agent_rejected_total", "record() calls rejected as bad input", ["agent", "reason"]
)
AGENT_LATE = Counter(
    "loadcast_agent_late_requests_total",
    "Requests whose window had already been published (counted in the current window)",
    ["agent"],
)
AGENT_WINDOWS = Counter(
    "loadcast_agent_windows_total", "Endpoint-windows closed and handed to the producer", ["agent"]
)
AGENT_ENDPOINTS = Gauge("loadcast_agent_endpoints", "Endpoints the agent tracks", ["agent"])

PRODUCER_SENT = Counter(
    "loadcast_producer_records_total", "Records handed to the Kafka producer", ["client", "topic"]
)
PRODUCER_DELIVERED = Counter(
    "loadcast_producer_delivered_total", "Records acknowledged by the broker", ["client"]
)
PRODUCER_FAILED = Counter(
    "loadcast_producer_delivery_failures_total",
    "Records the broker never acknowledged (after retries, message.timeout.ms)",
    ["client"],
)
PRODUCER_OVERFLOW = Counter(
    "loadcast_producer_overflow_total",
    "Records refused because the producer buffer bound was full (broker down or slow)",
    ["client"],
)
PRODUCER_QUEUED = Gauge(
    "loadcast_producer_queued_records", "Records waiting in the producer buffer", ["client"]
)
CONSUMER_SKIPPED = Counter(
    "loadcast_consumer_skipped_total", "Records a consumer could not decode and skipped",
    ["client", "reason"],
)


def serve_metrics(port: int, addr: str | None = None) -> None:
    """Serve ``/metrics`` on ``addr:port`` from a background thread (0 = do not serve).

    ``addr`` defaults to ``$LOADCAST_METRICS_HOST`` or loopback; containers set
    ``LOADCAST_METRICS_HOST=0.0.0.0`` so Prometheus in another container or pod can scrape.
    """
    if port:
        start_http_server(port, addr=addr or os.environ.get("LOADCAST_METRICS_HOST", "127.0.0.1"))
