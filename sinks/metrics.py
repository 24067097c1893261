"""Prometheus metrics of the ClickHouse sink (``loadcast_sink_<what>``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SINK_LAG = Gauge(
    "loadcast_sink_lag_records",
    "Records on the topic not yet stored in ClickHouse (high watermark - next to store)",
    ["topic"],
)
SINK_ROWS = Counter("loadcast_sink_rows_total", "Rows inserted into ClickHouse", ["table"])
SINK_RECORDS = Counter(
    "loadcast_sink_records_total", "Kafka records consumed and committed", ["topic"]
)
SINK_DEAD = Counter(
    "loadcast_sink_dead_letters_total", "Records sent to dead-letter by the sink", ["reason"]
)
SINK_SKIPPED = Counter(
    "loadcast_sink_already_stored_total",
    "Records re-read after a restart and skipped because ClickHouse already held them",
    ["topic"],
)
SINK_INSERT_FAILURES = Counter(
    "loadcast_sink_insert_failures_total", "Inserts that failed (retried after a back-off)"
)
SINK_INSERT_SECONDS = Histogram(
    "loadcast_sink_insert_seconds", "Time to insert one batch into one table", ["table"]
)
SINK_UP = Gauge("loadcast_sink_clickhouse_up", "1 while the last ClickHouse call succeeded")
SINK_SLOW_BATCHES = Counter(
    "loadcast_sink_refused_raw_batches_total",
    "Telemetry batches ClickHouse refused to decode (bad values); decoded in Python instead",
)
SINK_EXPIRED = Counter(
    "loadcast_sink_expired_rows_total",
    "Rows already older than sink.ttl_days when inserted: ClickHouse drops them at once",
    ["table"],
)
