"""The sink under failure, on the real embedded broker and chDB: kill -9 between insert and
commit, and ClickHouse unavailable for a while. Each record must end up stored exactly once
(raw counts, keys and the rollup totals, without FINAL), and nothing committed early."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.codec import Codec
from sinks.db import connect
from sinks.settings import SinkSettings
from sinks.sink import Sink
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from tests.test_sink import BAD_RECORDS, known_input, produce, wait_for

pytestmark = pytest.mark.slow

CRASHING_SINK = """
import json, os, sys, time
from sinks.settings import SinkSettings
from sinks.sink import Sink
from streams.kafka.settings import KafkaSettings
import threading

def hold():  # inserted, not yet committed: tell the test, which kill -9s us here
    print("INSERTED", flush=True)
    time.sleep(120)

k = KafkaSettings(**json.loads(os.environ["T_KAFKA"]))
s = SinkSettings(**json.loads(os.environ["T_SINK"]))
Sink(k, s, after_insert=hold).run(threading.Event())
"""


@pytest.fixture
def base_ms() -> int:
    return (time.time_ns() // 1_000_000) // 60_000 * 60_000 - 40 * 60_000


def more_records(kafka: KafkaSettings, codec: Codec, base: int) -> int:
    """A few records of other topics (anomalies, mirror status, routing decisions)."""
    p = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    n = 0
    for i in range(5):
        p.produce(topic_name(kafka, "anomalies"), codec.encode("Anomaly", {
            "endpoint_id": "e1", "api": "orders", "region": "eu", "detected_at": base + i,
            "window_start": base + i * 10_000, "score": 0.9, "threshold": 0.5}), key=b"e1")
        p.produce(topic_name(kafka, "mirror-status"), codec.encode("MirrorStatus", {
            "executor_id": "x1", "region": "eu", "api": "orders", "command_id": f"c{i}",
            "sequence": i, "state": "READY", "at": base + i * 1000}), key=b"eu")
        p.produce(topic_name(kafka, "routing-decisions"), codec.encode("RoutingDecision", {
            "sidecar_id": "s1", "region": "eu", "api": "orders", "at": base + i * 1000,
            "kind": "WEIGHTS", "policy": "score", "stale": i == 3,
            "weights": {"e1": 0.4, "e2": 0.6}}), key=b"s1")
        n += 3
    assert p.flush(30) == 0
    return n


def committed(kafka: KafkaSettings, group: str) -> list[int]:
    """Committed offsets of the group on the telemetry and load-scores partitions."""
    c = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": group})
    try:
        tps = [TopicPartition(topic_name(kafka, t), p)
               for t in ("telemetry", "load-scores") for p in range(kafka.partitions)]
        return [tp.offset for tp in c.committed(tps, timeout=10)]
    finally:
        c.close()


def check_exactly_once(dsn: str, windows: list[dict[str, Any]], scores: int, extra: int) -> None:
    client = connect(SinkSettings(dsn=dsn))
    try:
        def one(sql: str) -> Any:
            return client.query(sql).result_rows[0]

        # Raw counts without FINAL: duplicates would show.
        n, keys = one("SELECT count(), uniqExact(_partition, _offset, _idx) FROM telemetry")
        assert n == keys == len(windows)
        n, keys = one("SELECT count(), uniqExact(_partition, _offset) FROM load_scores")
        assert n == keys == scores
        for table in ("anomalies", "mirror_status", "routing_decisions"):
            n, keys = one(f"SELECT count(), uniqExact(_partition, _offset) FROM {table}")
            assert n == keys == extra // 3, table
        n, keys = one("SELECT count(), uniqExact(source_topic, source_partition, source_offset) "
                      "FROM dead_letter")
        assert n == keys == BAD_RECORDS
        # The rollups (materialized views, which cannot collapse duplicates) agree too.
        (requests,) = one("SELECT sum(requests) FROM telemetry_1m")
        assert requests == sum(w["request_count"] for w in windows)
        (points,) = one("SELECT count() FROM forecast_points")
        assert points == scores * 3
    finally:
        client.close()


def test_kill_9_between_insert_and_commit_stores_each_record_once(
    kafka: KafkaSettings, codec: Codec, base_ms: int, tmp_path: Path
) -> None:
    windows, scores = known_input(base_ms)
    n = produce(kafka, codec, windows, scores)
    extra = more_records(kafka, codec, base_ms)
    group = f"crash-{kafka.topic_prefix}"
    settings = SinkSettings(dsn=f"chdb://{tmp_path}/ch", group_id=group,
                            batch_max_seconds=1.0, admin_enabled=False)
    env = {**os.environ, "T_KAFKA": kafka.model_dump_json(),
           "T_SINK": json.dumps(settings.model_dump(mode="json") | {"admin_token": ""})}
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SINK], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline().strip() == "INSERTED", "no insert in 60s"
    finally:
        proc.kill()  # SIGKILL: between the insert and the commit
        proc.wait(10)
    assert proc.returncode == -9
    assert all(o < 0 for o in committed(kafka, group)), "committed before the crash"

    # The rows of that insert are in ClickHouse, uncommitted; a restarted sink re-reads
    # them, finds them stored, skips them, and stores the rest.
    sink = Sink(kafka, settings)
    stop = threading.Event()
    t = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    t.start()
    try:
        wait_for(lambda: sink.stats.records >= n + extra + BAD_RECORDS, 90, "the restarted sink")
    finally:
        stop.set()
        t.join(30)
    assert sink.stats.already_stored > 0
    assert max(committed(kafka, group)) > 0  # and now committed
    check_exactly_once(settings.dsn, windows, len(scores), extra)


def test_clickhouse_unavailable_then_back_loses_and_doubles_nothing(
    kafka: KafkaSettings, codec: Codec, base_ms: int, tmp_path: Path
) -> None:
    path = tmp_path / "ch"
    # Another process holds the chDB directory: the sink cannot open it.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import clickhouse_connect, sys; "
         f"c = clickhouse_connect.get_client(interface='chdb', path={str(path)!r}); "
         "print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stop = threading.Event()
    t: threading.Thread | None = None
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        windows, scores = known_input(base_ms)
        n = produce(kafka, codec, windows, scores)
        extra = more_records(kafka, codec, base_ms)
        group = f"outage-{kafka.topic_prefix}"
        settings = SinkSettings(dsn=f"chdb://{path}", group_id=group, batch_max_seconds=0.3,
                                backoff_initial_seconds=0.2, backoff_max_seconds=1.0,
                                admin_enabled=False)
        sink = Sink(kafka, settings)
        t = threading.Thread(target=sink.run, args=(stop,), kwargs={"lag_every": 0.5},
                             daemon=True)
        t.start()
        wait_for(lambda: sink.stats.insert_failures >= 3, 60, "failed attempts")
        wait_for(lambda: sum(sink.last_lag().values()) == n + extra, 30, "lag = everything")
        assert sink.stats.records == 0 and sink.stats.commits == 0
        assert all(o < 0 for o in committed(kafka, group)), "committed during the outage"
        assert "EmbeddedServer" in (sink.last_error or "")
        failures = sink.stats.insert_failures
    finally:
        holder.kill()
        holder.wait(10)
    try:
        # Back: the kept batch goes in, then the rest, the dead letters, and lag returns to 0.
        wait_for(lambda: sink.stats.records >= n + extra + BAD_RECORDS, 60, "recovery")
        wait_for(lambda: sum(sink.last_lag().values()) == 0, 30, "lag back to 0")
        assert sink.stats.insert_failures >= failures
        assert sink.stats.already_stored == 0
    finally:
        stop.set()
        if t is not None:
            t.join(30)
    assert max(committed(kafka, group)) > 0
    check_exactly_once(settings.dsn, windows, len(scores), extra)
