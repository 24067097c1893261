"""The ClickHouse schema: one table per topic, rollups, and versioned idempotent migrations.

Every topic table carries the Kafka coordinates of its rows (``_topic``, ``_partition``,
``_offset``, ``_idx`` = position inside a TelemetryBatch) and is a ReplacingMergeTree
whose sorting key ends in those coordinates: a row stored twice has the same key and
collapses (``FINAL`` in queries, merges on disk). The sink also skips records it finds
already stored after a restart (see :mod:`sinks.sink`), so the rollups fed by
materialized views, which cannot collapse duplicates, see each record once.

Tables are partitioned by day of their event time and expire after ``ttl_days``.

:func:`migrate` applies the numbered :data:`MIGRATIONS` that are not yet recorded in
``schema_migrations``; each statement is idempotent (``IF NOT EXISTS``), so a crash in the
middle of a migration is repaired by running it again.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

DT = "DateTime64(3, 'UTC')"
LC = "LowCardinality(String)"
META_COLUMNS: tuple[tuple[str, str], ...] = (
    ("_topic", LC),
    ("_partition", "UInt32"),
    ("_offset", "UInt64"),
    ("_idx", "UInt32"),
)
FORECAST_COLUMNS: tuple[tuple[str, str], ...] = (
    ("forecast_horizon", "Array(UInt16)"),
    ("forecast_at", f"Array({DT})"),
    ("forecast_mean", "Array(Float64)"),
    ("forecast_lower", "Array(Float64)"),
    ("forecast_upper", "Array(Float64)"),
)


@dataclass(frozen=True)
class TableSpec:
    """A topic table: its columns (meta columns come first), event-time column and key."""

    name: str
    topic: str  # short topic name
    columns: tuple[tuple[str, str], ...]
    time_column: str
    key: tuple[str, ...]  # leading sort columns, before the Kafka coordinates

    @property
    def insert_columns(self) -> list[str]:
        """Columns the sink fills, in order (``_ingested_at`` has a default)."""
        return [c for c, _ in META_COLUMNS] + [c for c, _ in self.columns]

    @property
    def order_by(self) -> tuple[str, ...]:
        # Dead-letter rows collapse on the coordinates of the record that failed, so a
        # record dead-lettered twice (sink crash before commit) is one row under FINAL.
        if self.name == "dead_letter":
            return (*self.key, "source_topic", "source_partition", "source_offset")
        return (*self.key, "_partition", "_offset", "_idx")


TABLES: tuple[TableSpec, ...] = (
    TableSpec(
        "telemetry", "telemetry",
        (
            ("endpoint_id", LC), ("region", LC), ("api", LC), ("agent_id", LC),
            ("window_start", DT), ("window_end", DT), ("interval_ms", "UInt32"),
            ("request_count", "UInt64"),
            # error classes: 4xx, 5xx, connect, timeout
            ("errors", "Map(LowCardinality(String), UInt64)"),
            ("latency_p50_ms", "Float64"), ("latency_p95_ms", "Float64"),
            ("latency_p99_ms", "Float64"), ("latency_max_ms", "Float64"),
            ("cpu_percent", "Float32"), ("memory_percent", "Float32"),
            ("net_in_bytes", "UInt64"), ("net_out_bytes", "UInt64"), ("in_flight", "UInt32"),
            ("distinct_clients", "Nullable(UInt64)"), ("attributes", "Map(String, String)"),
        ),
        "window_start", ("endpoint_id", "window_start"),
    ),
    TableSpec(
        "load_scores", "load-scores",
        (
            ("endpoint_id", LC), ("api", LC), ("region", LC),
            ("computed_at", DT), ("valid_until", DT), ("score", "Float64"),
            ("capacity_rps", "Float64"), ("capacity_source", LC), ("current_rps", "Float64"),
            ("predicted_utilization", "Float64"), ("latency_p99_ms", "Float64"),
            ("error_rate", "Float64"), ("anomaly_score", "Float64"), ("step_seconds", "UInt32"),
            *FORECAST_COLUMNS,
            ("model", LC), ("reasons", "Array(String)"),
        ),
        "computed_at", ("endpoint_id", "computed_at"),
    ),
    TableSpec(
        "mirror_commands", "mirror-commands",
        (
            ("command_id", "String"), ("action", LC), ("api", LC), ("region", LC),
            ("bundle_digest", "String"), ("desired_instances", "UInt32"),
            ("sequence", "UInt64"), ("issued_at", DT), ("expires_at", DT), ("reason", "String"),
            ("central_capacity_rps", "Float64"), *FORECAST_COLUMNS,
            ("key_id", LC), ("signature", "String"),
        ),
        "issued_at", ("api", "region", "issued_at"),
    ),
    TableSpec(
        "mirror_status", "mirror-status",
        (
            ("executor_id", LC), ("region", LC), ("api", LC), ("command_id", "String"),
            ("sequence", "UInt64"), ("state", LC), ("at", DT),
            ("instance_url", "Nullable(String)"), ("bundle_digest", "Nullable(String)"),
            ("reason", "String"), ("capacity_rps", "Nullable(Float64)"),
        ),
        "at", ("api", "region", "at"),
    ),
    TableSpec(
        "routing_decisions", "routing-decisions",
        (
            ("sidecar_id", LC), ("region", LC), ("api", LC), ("at", DT), ("kind", LC),
            ("policy", LC), ("stale", "Bool"),
            ("weights", "Map(LowCardinality(String), Float64)"),
            ("previous_weights", "Map(LowCardinality(String), Float64)"),
            ("scores", "Map(LowCardinality(String), Float64)"),
            ("endpoint_id", "LowCardinality(Nullable(String))"), ("status", "Nullable(UInt16)"),
            ("latency_ms", "Nullable(Float64)"), ("attempts", "UInt32"),
            ("dynamic_routing", "Bool"),
        ),
        "at", ("api", "at"),
    ),
    TableSpec(
        "model_updates", "model-updates",
        (
            ("family", LC), ("edge_id", LC), ("round", "UInt32"), ("base_version", "UInt32"),
            ("created_at", DT), ("num_samples", "UInt64"),
            ("validation_mae", "Nullable(Float64)"),
            ("delta", "Map(String, Array(Float64))"), ("scaler", "Map(String, Array(Float64))"),
        ),
        "created_at", ("family", "round", "edge_id"),
    ),
    TableSpec(
        "global_model", "global-model",
        (
            ("family", LC), ("version", "UInt32"), ("round", "UInt32"), ("created_at", DT),
            ("aggregation", LC), ("participants", "Array(String)"), ("num_samples", "UInt64"),
            ("params", "Map(String, Array(Float64))"), ("scaler", "Map(String, Array(Float64))"),
            ("metrics", "Map(LowCardinality(String), Float64)"),
        ),
        "created_at", ("family", "version"),
    ),
    TableSpec(
        "anomalies", "anomalies",
        (
            ("endpoint_id", LC), ("api", LC), ("region", LC), ("detected_at", DT),
            ("window_start", DT), ("score", "Float64"), ("threshold", "Float64"),
            ("detector", LC), ("features", "Map(LowCardinality(String), Float64)"),
        ),
        "window_start", ("endpoint_id", "window_start"),
    ),
    # The task API (streams.tasks) and its swarm: every attempt, every status change, every
    # result (a task's visible state is the fold of its statuses: processors.tasking).
    TableSpec(
        "tasks", "tasks",
        (
            ("task_id", "String"), ("task_type", LC), ("attempt", "UInt32"),
            ("max_attempts", "UInt32"), ("lease_ms", "UInt64"), ("submitted_at", DT),
            ("enqueued_at", DT), ("description", "String"), ("requirements", "String"),
        ),
        "enqueued_at", ("task_type", "enqueued_at"),
    ),
    TableSpec(
        "task_status", "task-status",
        (
            ("task_id", "String"), ("task_type", LC), ("state", LC), ("attempt", "UInt32"),
            ("max_attempts", "UInt32"), ("at", DT), ("submitted_at", DT),
            ("started_at", f"Nullable({DT})"), ("worker", "LowCardinality(Nullable(String))"),
            ("reason", "String"), ("source", LC),
        ),
        "at", ("task_type", "at"),
    ),
    TableSpec(
        "task_results", "task-results",
        (
            ("task_id", "String"), ("task_type", LC), ("attempt", "UInt32"), ("worker", LC),
            ("at", DT), ("started_at", DT), ("output", "String"),
            ("output_ref", "Nullable(String)"), ("output_bytes", "UInt64"),
        ),
        "at", ("task_type", "at"),
    ),
    TableSpec(
        "dead_letter", "dead-letter",
        (
            ("source_topic", LC), ("source_partition", "Int32"), ("source_offset", "Int64"),
            ("reason", LC), ("detail", "String"), ("at", DT),
            ("key", "String"), ("value", "String"), ("headers", "Map(String, String)"),
        ),
        "at", (),
    ),
)
TABLE_BY_TOPIC = {t.topic: t for t in TABLES}
TABLE_BY_NAME = {t.name: t for t in TABLES}


def _ttl(spec: TableSpec, ttl_days: int) -> str:
    if ttl_days <= 0:
        return ""
    return f"TTL toDateTime({spec.time_column}) + INTERVAL {ttl_days} DAY"


def create_table_sql(spec: TableSpec, ttl_days: int) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for one topic table."""
    cols = ",\n  ".join(
        f"`{c}` {t}"
        for c, t in (*META_COLUMNS, *spec.columns, ("_ingested_at", f"{DT} DEFAULT now64(3)"))
    )
    return (
        f"CREATE TABLE IF NOT EXISTS {spec.name} (\n  {cols}\n)\n"
        f"ENGINE = ReplacingMergeTree\n"
        f"PARTITION BY toDate({spec.time_column})\n"
        f"ORDER BY ({', '.join(spec.order_by)})\n"
        f"{_ttl(spec, ttl_days)}\n"
        # non_replicated_deduplication_window: a retried insert of the same block (same
        # insert_deduplication_token) is dropped, also in the views it feeds.
        "SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1"
    )


def _rollup_statements(ttl_days: int) -> list[str]:
    ttl_minute = f"TTL toDateTime(minute) + INTERVAL {ttl_days} DAY" if ttl_days > 0 else ""
    ttl_at = f"TTL toDateTime(at) + INTERVAL {ttl_days} DAY" if ttl_days > 0 else ""
    settings = "SETTINGS non_replicated_deduplication_window = 1000"
    return [
        # Per endpoint per minute: totals and mergeable latency states. Window quantiles
        # cannot be merged exactly; the rollup keeps request-weighted sums of them
        # (weighted mean = sum / requests) and the maximum.
        f"""CREATE TABLE IF NOT EXISTS telemetry_1m (
  endpoint_id {LC},
  minute DateTime('UTC'),
  api SimpleAggregateFunction(any, {LC}),
  region SimpleAggregateFunction(any, {LC}),
  windows SimpleAggregateFunction(sum, UInt64),
  requests SimpleAggregateFunction(sum, UInt64),
  errors SimpleAggregateFunction(sumMap, Map(String, UInt64)),
  p50_x_requests SimpleAggregateFunction(sum, Float64),
  p95_x_requests SimpleAggregateFunction(sum, Float64),
  p99_x_requests SimpleAggregateFunction(sum, Float64),
  latency_max_ms SimpleAggregateFunction(max, Float64),
  p99_digest AggregateFunction(quantileTDigestWeighted(0.99), Float64, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toDate(minute)
ORDER BY (endpoint_id, minute)
{ttl_minute}
{settings}""",
        """CREATE MATERIALIZED VIEW IF NOT EXISTS telemetry_1m_mv TO telemetry_1m AS
SELECT endpoint_id, toStartOfMinute(window_start) AS minute,
  any(api) AS api, any(region) AS region,
  count() AS windows, sum(request_count) AS requests,
  sumMap(CAST(errors, 'Map(String, UInt64)')) AS errors,
  sum(latency_p50_ms * request_count) AS p50_x_requests,
  sum(latency_p95_ms * request_count) AS p95_x_requests,
  sum(latency_p99_ms * request_count) AS p99_x_requests,
  max(latency_max_ms) AS latency_max_ms,
  quantileTDigestWeightedState(0.99)(latency_p99_ms, request_count) AS p99_digest
FROM telemetry GROUP BY endpoint_id, minute""",
        # One row per forecast point, so forecasts can meet actuals by (endpoint, at).
        f"""CREATE TABLE IF NOT EXISTS forecast_points (
  endpoint_id {LC}, api {LC}, region {LC},
  computed_at {DT}, step_seconds UInt32,
  horizon UInt16, at {DT}, mean Float64, lower Float64, upper Float64,
  _partition UInt32, _offset UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(at)
ORDER BY (endpoint_id, at, horizon, computed_at, _partition, _offset)
{ttl_at}
{settings}""",
        """CREATE MATERIALIZED VIEW IF NOT EXISTS forecast_points_mv TO forecast_points AS
SELECT endpoint_id, api, region, computed_at, step_seconds,
  h AS horizon, a AS at, m AS mean, lo AS lower, hi AS upper, _partition, _offset
FROM load_scores
ARRAY JOIN forecast_horizon AS h, forecast_at AS a, forecast_mean AS m,
  forecast_lower AS lo, forecast_upper AS hi""",
    ]


def _forecast_error_statements(ttl_days: int) -> list[str]:
    ttl_at = f"TTL toDateTime(at) + INTERVAL {ttl_days} DAY" if ttl_days > 0 else ""
    return [
        f"""CREATE TABLE IF NOT EXISTS forecast_errors_1m (
  endpoint_id {LC}, horizon UInt16, minute DateTime('UTC'), at {DT},
  computed_at {DT}, mean Float64, lower Float64, upper Float64, actual Float64,
  abs_error Float64, covered UInt8
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(at)
ORDER BY (endpoint_id, horizon, at, computed_at)
{ttl_at}""",
        # Forecasts meet actuals only once the step has passed, so this rollup is
        # refreshed (recomputed) every minute rather than fed per insert.
        """CREATE MATERIALIZED VIEW IF NOT EXISTS forecast_errors_1m_rmv
REFRESH EVERY 1 MINUTE TO forecast_errors_1m AS
SELECT p.endpoint_id AS endpoint_id, p.horizon AS horizon,
  toStartOfMinute(p.at) AS minute, p.at AS at, p.computed_at AS computed_at,
  p.mean AS mean, p.lower AS lower, p.upper AS upper,
  sum(t.request_count) / any(p.step_seconds) AS actual,
  abs(p.mean - actual) AS abs_error,
  toUInt8(actual >= p.lower AND actual <= p.upper) AS covered
FROM (SELECT * FROM forecast_points FINAL) AS p
INNER JOIN (SELECT endpoint_id, window_start, request_count FROM telemetry FINAL) AS t
  ON t.endpoint_id = p.endpoint_id AND t.window_start >= p.at
  AND t.window_start < p.at + toIntervalSecond(p.step_seconds)
GROUP BY p.endpoint_id, p.horizon, p.at, p.computed_at, p.mean, p.lower, p.upper""",
    ]


@dataclass(frozen=True)
class Migration:
    """One schema version: statements built from the settings (TTL)."""

    version: int
    description: str

    def statements(self, ttl_days: int) -> list[str]:
        if self.version == 1:
            return [create_table_sql(t, ttl_days) for t in TABLES]
        if self.version == 2:
            return _rollup_statements(ttl_days)
        if self.version == 3:
            return _forecast_error_statements(ttl_days)
        if self.version == 4:  # tables added after version 1 (IF NOT EXISTS: no-op if new)
            return [create_table_sql(TABLE_BY_NAME[n], ttl_days)
                    for n in ("tasks", "task_status", "task_results")]
        raise ValueError(f"no migration {self.version}")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "one table per topic"),
    Migration(2, "per-minute telemetry rollup, forecast points"),
    Migration(3, "forecast error rollup (refreshed)"),
    Migration(4, "task API tables: tasks, task_status, task_results"),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def applied_versions(client: Client) -> set[int]:
    """Versions recorded in ``schema_migrations``."""
    client.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, description String, "
        f"applied_at {DT} DEFAULT now64(3)) ENGINE = ReplacingMergeTree ORDER BY version"
    )
    rows = client.query("SELECT DISTINCT version FROM schema_migrations").result_rows
    return {int(r[0]) for r in rows}


def migrate(client: Client, ttl_days: int) -> list[int]:
    """Apply missing migrations in order, then bring table TTLs in line with ``ttl_days``.

    Returns the versions applied now (empty when the schema was current).
    """
    done = applied_versions(client)
    applied = []
    for m in MIGRATIONS:
        if m.version in done:
            continue
        for sql in m.statements(ttl_days):
            client.command(sql)
        client.insert(
            "schema_migrations", [[m.version, m.description]],
            column_names=["version", "description"],
        )
        applied.append(m.version)
        log.info("schema migration %d applied: %s", m.version, m.description)
    align_ttl(client, ttl_days)
    return applied


_TTL_RE = re.compile(r"TTL .*?toIntervalDay\((\d+)\)")


def align_ttl(client: Client, ttl_days: int) -> list[str]:
    """ALTER the TTL of topic tables whose TTL differs from ``ttl_days``; names changed."""
    rows = client.query(
        "SELECT name, engine_full FROM system.tables WHERE database = currentDatabase()"
    ).result_rows
    current = {name: engine for name, engine in rows}
    changed = []
    for spec in TABLES:
        engine = current.get(spec.name)
        if engine is None:
            continue
        m = _TTL_RE.search(engine)
        have = int(m.group(1)) if m else 0
        if have == ttl_days:
            continue
        if ttl_days > 0:
            sql = f"ALTER TABLE {spec.name} MODIFY {_ttl(spec, ttl_days)}"
        else:
            sql = f"ALTER TABLE {spec.name} REMOVE TTL"
        # Do not rewrite old parts now: expired parts go on the next merge.
        client.command(sql, settings={"materialize_ttl_after_modify": 0})
        changed.append(spec.name)
    return changed
