"""Prometheus metrics of ``loadcast api`` (``loadcast_api_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "loadcast_api_requests_total", "HTTP requests answered, by route and status",
    ["route", "status"],
)
LATENCY = Histogram(
    "loadcast_api_request_seconds", "Time to answer, by route", ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
ENDPOINTS = Gauge("loadcast_api_endpoints", "Endpoints with a score")
SCORE_AGE = Gauge("loadcast_api_newest_score_age_seconds", "Age of the newest score")
RECORDS = Counter("loadcast_api_records_total", "Records applied from Kafka")
SKIPPED = Counter(
    "loadcast_api_records_skipped_total", "Records dead-lettered by the feed", ["reason"]
)
