"""Sink throughput: topic → ClickHouse rows/s, next to a raw clickhouse-connect insert.

Side by side in one run, one process, one embedded chDB directory (two databases with the
same schema, materialized views included):

- ``raw``: ``client.insert`` of the same telemetry rows, already converted and columnar,
  in blocks as large as the sink's (the baseline: what clickhouse-connect and chDB do
  without loadcast);
- ``sink``: the loadcast sink consuming TelemetryBatch values (``--windows`` per value)
  from the embedded broker (Tansu), handing the Avro bodies to ClickHouse to decode
  (:mod:`sinks.avro_ingest`; range checks in the view) and committing offsets. Timed from
  the first record consumed to the last row stored (group join and chDB start-up
  excluded; they are once per process).
- ``sink_python_decode``: the same sink with ``decode_in_clickhouse = false``: decoding,
  range checks and conversion in Python, columnar inserts (the path refused batches take).

Rates are rows per wall second, medians over ``--repeats`` runs.

    python benchmarks/sink.py            # full run
    python benchmarks/sink.py --quick    # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from rich.console import Console
from rich.table import Table

from schemas.codec import Codec
from sinks.convert import telemetry_row
from sinks.db import connect
from sinks.ddl import TABLE_BY_NAME, migrate
from sinks.settings import SinkSettings
from sinks.sink import Sink
from streams.kafka.broker import EmbeddedBroker
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import ensure_topics, topic_name

OUT = Path(__file__).resolve().parents[1] / "out" / "benchmarks" / "sink.json"


def windows(n: int, base: int, endpoints: int = 500) -> list[dict[str, Any]]:
    """``n`` realistic endpoint-windows over ``endpoints`` endpoints, starting at ``base``."""
    return [
        {
            "endpoint_id": f"orders-{i % endpoints:04d}", "region": "eu-west", "api": "orders",
            "agent_id": "bench", "window_start": base + (i // endpoints) * 5000,
            "window_end": base + 5000 + (i // endpoints) * 5000, "interval_ms": 5000,
            "request_count": 100 + i % 37, "errors_4xx": i % 3, "errors_5xx": i % 2,
            "errors_connect": 0, "latency_p50_ms": 12.5, "latency_p95_ms": 40.0,
            "latency_p99_ms": 80.0 + i % 11, "latency_max_ms": 150.0, "cpu_percent": 35.0,
            "memory_percent": 61.0, "net_in_bytes": 10_000, "net_out_bytes": 30_000,
            "in_flight": 3, "errors_timeout": 0, "distinct_clients": None, "attributes": {},
        }
        for i in range(n)
    ]


def run_raw(path: Path, rows: list[dict[str, Any]], block: int, run: int) -> float:
    """Raw clickhouse-connect inserts of pre-converted columnar rows; rows/s."""
    settings = SinkSettings(dsn=f"chdb://{path}", database=f"raw{run}")
    client = connect(settings)
    try:
        migrate(client, settings.ttl_days)
        spec = TABLE_BY_NAME["telemetry"]
        tuples = [("t", 0, i, 0, *telemetry_row(w)) for i, w in enumerate(rows)]
        blocks = [list(zip(*tuples[i:i + block], strict=True))
                  for i in range(0, len(tuples), block)]
        t0 = time.perf_counter()
        for cols in blocks:
            client.insert("telemetry", cols, column_names=spec.insert_columns,
                          column_oriented=True)
        elapsed = time.perf_counter() - t0
        (n,) = client.query("SELECT count() FROM telemetry").result_rows[0]
        assert n == len(rows), (n, len(rows))
    finally:
        client.close()
    return len(rows) / elapsed


def run_sink(path: Path, broker: EmbeddedBroker, codec: Codec, rows: list[dict[str, Any]],
             per_value: int, batch_records: int, run: int, in_clickhouse: bool = True) -> float:
    """Produce TelemetryBatch values, then time the sink storing them; rows/s."""
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap,
                          topic_prefix=f"b{uuid.uuid4().hex[:6]}.", partitions=3)
    ensure_topics(kafka)
    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20,
                  "batch.size": 1_000_000})
    topic = topic_name(kafka, "telemetry")
    for i in range(0, len(rows), per_value):
        chunk = rows[i:i + per_value]
        value = codec.encode("TelemetryBatch", {"agent_id": "bench", "region": "eu-west",
                                                "created_at": chunk[0]["window_start"],
                                                "windows": chunk})
        p.produce(topic, value, key=str(i).encode())
        p.poll(0)
    assert p.flush(60) == 0
    settings = SinkSettings(dsn=f"chdb://{path}", database=f"sink{run}{int(in_clickhouse)}",
                            topics=["telemetry"], decode_in_clickhouse=in_clickhouse,
                            group_id=f"bench-{kafka.topic_prefix}",
                            batch_max_records=batch_records, batch_max_seconds=2.0,
                            admin_enabled=False)
    # A sink that has been running has committed offsets; without them librdkafka first
    # asks the broker for the earliest offsets (slow on Tansu): a start-up cost, not
    # throughput.
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": settings.group_id})
    c.commit(offsets=[TopicPartition(topic, p, 0) for p in range(kafka.partitions)],
             asynchronous=False)
    c.close()
    client = connect(settings)
    migrate(client, settings.ttl_days)  # start-up cost, not throughput
    sink = Sink(kafka, settings, codec=codec, client_factory=lambda: client)
    stop = threading.Event()
    t = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    t.start()
    deadline = time.monotonic() + 600
    t0 = None
    try:
        while time.monotonic() < deadline:
            if t0 is None and (sink.pending or sink.stats.records):
                t0 = time.perf_counter()
            if sink.stats.rows >= len(rows):
                break
            time.sleep(0.002)
        t1 = time.perf_counter()
    finally:
        stop.set()
        t.join(60)
    if sink.stats.rows < len(rows) or t0 is None:
        raise RuntimeError(f"sink stored {sink.stats.rows} of {len(rows)} rows in time")
    check = connect(settings)
    try:
        (n,) = check.query("SELECT count() FROM telemetry").result_rows[0]
        assert n == len(rows), (n, len(rows))
    finally:
        check.close()
    return len(rows) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--windows", type=int, default=100, help="windows per TelemetryBatch")
    ap.add_argument("--batch-records", type=int, default=1000,
                    help="sink batch size, Kafka records (x --windows rows)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="50k rows, 100-record batches, 1 run")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.quick:
        args.rows, args.repeats, args.batch_records = 50_000, 1, 100
    logging.basicConfig(level=logging.WARNING)
    codec = Codec.embedded()
    base = (time.time_ns() // 1_000_000) // 60_000 * 60_000 - 3_600_000
    rows = windows(args.rows, base)
    block = args.batch_records * args.windows
    tmp = Path(tempfile.mkdtemp(prefix="loadcast-bench-sink-"))
    raw: list[float] = []
    sink: list[float] = []
    python: list[float] = []
    try:
        with EmbeddedBroker() as broker:
            for r in range(args.repeats):  # interleaved, so drift hits both alike
                raw.append(run_raw(tmp / "ch", rows, block, r))
                sink.append(run_sink(tmp / "ch", broker, codec, rows, args.windows,
                                     args.batch_records, r))
                python.append(run_sink(tmp / "ch", broker, codec, rows, args.windows,
                                       args.batch_records, r, in_clickhouse=False))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    raw_med, sink_med = statistics.median(raw), statistics.median(sink)
    py_med = statistics.median(python)
    result = {
        "rows": args.rows, "windows_per_value": args.windows, "block_rows": block,
        "repeats": args.repeats,
        "modes": {
            "raw": {"rows_per_s": raw_med, "runs": raw, "ratio_vs_raw": 1.0},
            "sink": {"rows_per_s": sink_med, "runs": sink, "ratio_vs_raw": sink_med / raw_med},
            "sink_python_decode": {"rows_per_s": py_med, "runs": python,
                                   "ratio_vs_raw": py_med / raw_med},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    table = Table(title=f"sink: {args.rows} telemetry rows into chDB, median of {args.repeats}")
    for c in ("mode", "rows/s", "ratio vs raw", "runs (rows/s)"):
        table.add_column(c)
    for name, m in result["modes"].items():
        table.add_row(name, f"{m['rows_per_s']:,.0f}", f"{m['ratio_vs_raw']:.2f}",
                      ", ".join(f"{x:,.0f}" for x in m["runs"]))
    Console(width=120).print(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
