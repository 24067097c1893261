"""Prometheus metrics of the routing sidecar (``loadcast_sidecar_*``, label ``sidecar``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "loadcast_sidecar_requests_total",
    "Requests routed by the built-in proxy, by API, endpoint and outcome",
    ["sidecar", "api", "endpoint", "outcome"],
)
LATENCY = Histogram(
    "loadcast_sidecar_request_seconds",
    "Upstream latency of proxied requests (first byte of the response)",
    ["sidecar", "api"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RETRIES = Counter(
    "loadcast_sidecar_retries_total",
    "Requests sent to the next endpoint after a connection failure",
    ["sidecar", "api"],
)
REJECTED = Counter(
    "loadcast_sidecar_rejected_total",
    "Requests answered by the sidecar itself: no_endpoint (503), shed (503), "
    "sent_then_failed (502), bad_request (4xx)",
    ["sidecar", "api", "reason"],
)
EJECTIONS = Counter(
    "loadcast_sidecar_ejections_total", "Outlier ejections after consecutive failures",
    ["sidecar", "endpoint"],
)
EJECTED = Gauge(
    "loadcast_sidecar_endpoint_ejected", "1 while the endpoint is ejected", ["sidecar", "endpoint"]
)
WEIGHT = Gauge(
    "loadcast_sidecar_weight", "Relative routing weight (best endpoint = 1)",
    ["sidecar", "api", "endpoint"],
)
STALE = Gauge(
    "loadcast_sidecar_scores_stale",
    "1 while the API's scores are past valid_until and the fallback policy routes",
    ["sidecar", "api"],
)
POLICY = Gauge(
    "loadcast_sidecar_policy_active", "1 for the policy routing the API now",
    ["sidecar", "api", "policy"],
)
WEIGHT_CHANGES = Counter(
    "loadcast_sidecar_weight_changes_total", "Weight-table changes applied", ["sidecar", "api"]
)
FALLBACKS = Counter(
    "loadcast_sidecar_stale_fallbacks_total",
    "Times an API's scores went stale and the fallback policy took over",
    ["sidecar", "api"],
)
SCORES_RECEIVED = Counter(
    "loadcast_sidecar_scores_received_total", "LoadScore and Anomaly records applied", ["sidecar"]
)
SCORES_SKIPPED = Counter(
    "loadcast_sidecar_scores_skipped_total",
    "Records on the score topics that did not decode (sent to dead-letter)",
    ["sidecar", "reason"],
)
HAPROXY_UPDATES = Counter(
    "loadcast_sidecar_haproxy_updates_total", "Runtime-API weight writes to HAProxy",
    ["sidecar", "outcome"],
)
SHED = Gauge(
    "loadcast_sidecar_shed_share", "Share of traffic being shed (offered rate over known capacity)",
    ["sidecar", "api"],
)
MIRRORS_REFUSED = Counter(
    "loadcast_sidecar_mirrors_refused_total",
    "READY mirror-status records whose host is not in mirror_hosts (ignored: never forwarded to)",
    ["sidecar"],
)
CACHE_LOOKUPS = Counter(
    "loadcast_sidecar_cache_total",
    "Response-cache answers: hit, miss, stale (served stale: while revalidating or on an "
    "origin error), revalidated (304 from the origin), collapsed (waited for another "
    "request's origin fetch), bypass (not cacheable request)",
    ["sidecar", "api", "result"],
)
CACHE_NOT_STORED = Counter(
    "loadcast_sidecar_cache_not_stored_total",
    "Origin responses not stored, by reason (no-store, private, credentials, no-lifetime...)",
    ["sidecar", "api", "reason"],
)
CACHE_EVICTIONS = Counter(
    "loadcast_sidecar_cache_evictions_total", "Stored responses evicted (LRU, memory bound)",
    ["sidecar", "api"],
)
CACHE_BYTES = Gauge(
    "loadcast_sidecar_cache_bytes", "Bytes held by the response cache", ["sidecar", "api"]
)
CACHE_ORIGIN = Counter(
    "loadcast_sidecar_cache_origin_requests_total",
    "Origin requests made by the cache: fetch (a miss), revalidate, background (stale-while-"
    "revalidate), warm (forecast-gated warming)",
    ["sidecar", "api", "kind"],
)
COMPRESSED = Counter(
    "loadcast_sidecar_compressed_total", "Responses compressed by the proxy, by coding",
    ["sidecar", "coding"],
)
RATE_LIMITED = Counter(
    "loadcast_sidecar_rate_limited_total", "Requests refused with 429 by the per-client limits",
    ["sidecar", "api"],
)
RATE_FACTOR = Gauge(
    "loadcast_sidecar_rate_limit_headroom",
    "Forecast headroom the API's rate limits follow (1 = no forecast pressure)",
    ["sidecar", "api"],
)
WARM_ACTIVE = Gauge(
    "loadcast_sidecar_warming_active", "1 while the forecast gate keeps the API's cache warm",
    ["sidecar", "api"],
)
