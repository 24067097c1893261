"""ClickHouse decoding telemetry itself (sinks.avro_ingest) on embedded chDB: the rows
equal the Python conversion's, bad values store nothing, a retried insert is dropped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.codec import Codec, EmbeddedIds
from sinks.avro_ingest import FastPath, batch_windows
from sinks.convert import rows_for
from sinks.db import close_quietly, connect
from sinks.ddl import TABLE_BY_NAME, migrate
from sinks.settings import SinkSettings

pytestmark = pytest.mark.slow


def window(i: int, base: int) -> dict[str, Any]:
    return {
        "endpoint_id": f"e{i % 3}", "region": "eu", "api": "orders", "agent_id": "a1",
        "window_start": base + i * 5000, "window_end": base + (i + 1) * 5000,
        "interval_ms": 5000, "request_count": 10 + i, "errors_4xx": i % 2, "errors_5xx": 1,
        "errors_connect": i % 3, "latency_p50_ms": 5.5 + i, "latency_p95_ms": 20.25,
        "latency_p99_ms": 40.0 + i, "latency_max_ms": 90.0, "cpu_percent": 12.5,
        "memory_percent": 99.5, "net_in_bytes": 2**40 + i, "net_out_bytes": 7,
        "in_flight": i, "errors_timeout": 2 * i,
        "distinct_clients": None if i % 2 else 50 + i,
        "attributes": {} if i % 3 else {"zone": f"z{i}", "tier": "gold"},
    }


@pytest.fixture
def dbs(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """Two databases in one chDB directory: the fast path's and the Python path's."""
    clients = []
    for name in ("fast", "slow"):
        settings = SinkSettings(dsn=f"chdb://{tmp_path}/ch", database=name)
        client = connect(settings)
        migrate(client, settings.ttl_days)
        clients.append(client)
    try:
        yield clients[0], clients[1]
    finally:
        for c in clients:
            close_quietly(c)


SELECT = ("SELECT * EXCEPT _ingested_at FROM telemetry ORDER BY _topic, _partition, _offset, "
          "_idx")


def test_rows_equal_the_python_conversion_and_retries_are_dropped(
    dbs: tuple[Any, Any]
) -> None:
    fast_db, slow_db = dbs
    codec = Codec.embedded()
    fast = FastPath(codec)
    for sql in fast.ddl():
        fast_db.command(sql)
    base = (time.time_ns() // 1_000_000) // 60_000 * 60_000 - 3_600_000
    ws = [window(i, base) for i in range(12)]
    singles = [("p.telemetry", 1, 100 + i, codec.encode("EndpointTelemetry", w))
               for i, w in enumerate(ws[:5])]
    batches = [("p.telemetry", 2, 7 + k, codec.encode("TelemetryBatch", {
        "agent_id": "a1", "region": "eu", "created_at": base, "windows": ws[5 + 4 * k:9 + 4 * k]}))
        for k in range(2)]
    t_single, t_batch = fast.tables
    assert fast.table_for(singles[0][3]) is t_single
    assert fast.table_for(batches[0][3]) is t_batch
    assert fast.table_for(b"\x00\x00\x00\x00\x00junk") is None
    assert [batch_windows(v) for *_, v in batches] == [4, 3]

    token = {"insert_deduplication_token": "batch-1",
             "deduplicate_blocks_in_dependent_materialized_views": 1}
    for _ in range(2):  # the second, same-token insert is a retry: dropped
        fast_db.raw_insert(t_single.table, None, fast.container(t_single, singles),
                           fmt="Avro", settings=token)
    fast_db.raw_insert(t_batch.table, None, fast.container(t_batch, batches), fmt="Avro",
                       settings={**token, "insert_deduplication_token": "batch-2"})

    spec = TABLE_BY_NAME["telemetry"]
    rows = []
    for topic, partition, offset, value in [*singles, *batches]:
        for i, r in enumerate(rows_for("telemetry", codec.decode(value))):
            rows.append((topic, partition, offset, i, *r))
    slow_db.insert("telemetry", rows, column_names=spec.insert_columns)

    got = fast_db.query(SELECT).result_rows
    want = slow_db.query(SELECT).result_rows
    assert len(got) == len(want) == 12
    assert got == want
    rollup = ("SELECT endpoint_id, minute, sum(windows), sum(requests) FROM telemetry_1m "
              "GROUP BY endpoint_id, minute ORDER BY endpoint_id, minute")
    assert fast_db.query(rollup).result_rows == slow_db.query(rollup).result_rows


@pytest.mark.parametrize("bad", [
    {"cpu_percent": 250.0}, {"latency_p99_ms": float("nan")}, {"request_count": -1},
    {"window_start": 10**15}, {"distinct_clients": -3},
])
def test_a_bad_value_makes_the_whole_insert_store_nothing(
    dbs: tuple[Any, Any], bad: dict[str, Any]
) -> None:
    fast_db, _ = dbs
    unchecked = Codec(EmbeddedIds(), validate_on_encode=False)
    fast = FastPath(unchecked)
    for sql in fast.ddl():
        fast_db.command(sql)
    base = (time.time_ns() // 1_000_000) // 60_000 * 60_000 - 3_600_000
    good = [window(i, base) for i in range(4)]
    batch = unchecked.encode("TelemetryBatch", {
        "agent_id": "a1", "region": "eu", "created_at": base,
        "windows": [*good, {**good[0], **bad}]})
    t_batch = fast.tables[1]
    with pytest.raises(Exception, match="out_of_range"):
        fast_db.raw_insert(t_batch.table, None,
                           fast.container(t_batch, [("t", 0, 1, batch)]), fmt="Avro")
    assert fast_db.query("SELECT count() FROM telemetry").result_rows == [(0,)]
    # Garbage after a valid header: refused too, nothing stored.
    with pytest.raises(Exception):  # noqa: B017 - ClickHouse's parse error, any kind
        fast_db.raw_insert(t_batch.table, None,
                           fast.container(t_batch, [("t", 0, 2, batch[:-30])]), fmt="Avro")
    assert fast_db.query("SELECT count() FROM telemetry").result_rows == [(0,)]
