"""The edge agent against the real embedded broker."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from schemas.codec import Codec
from streams.edge.agent import TelemetryInputError, build_agent, zero_host_stats
from streams.edge.replay import read_trace
from streams.kafka.partitioning import partition_for
from streams.kafka.producer import RecordProducer
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from tests.conftest import ELB
from tests.kafka_helpers import read_topic


def windows_of(codec: Codec, msgs: list[Any]) -> list[dict[str, Any]]:
    out = []
    for m in msgs:
        rec = codec.decode(m.value())
        out.extend(rec.get("windows", [rec]))
    return out


@pytest.mark.parametrize("mode", ["--single", "--batch"])
def test_cli_replay_publishes_what_was_replayed(
    kafka: KafkaSettings, codec: Codec, mode: str
) -> None:
    """`loadcast agent --replay elb.csv`: per-window request counts equal the trace."""
    env = {**os.environ, "LOADCAST_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
           "LOADCAST_KAFKA__PARTITIONS": "3"}
    limit = None if mode == "--single" else 800
    cmd = [sys.executable, "-m", "loadcast", "agent", "--bootstrap", kafka.bootstrap_servers,
           "--region", "eu-west", "--replay", str(ELB), "--interval", "300", "--endpoints", "3",
           "--api", "orders", mode, "--keep-timestamps"]
    if limit:
        cmd += ["--limit", str(limit)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    trace = read_trace(ELB, limit)
    msgs = read_topic(kafka.bootstrap_servers, topic_name(kafka, "telemetry"))
    windows = windows_of(codec, msgs)
    got: dict[int, int] = {}
    for w in windows:
        assert w["api"] == "orders" and w["region"] == "eu-west"
        got[w["window_start"]] = got.get(w["window_start"], 0) + w["request_count"]
    want = {round(ts * 1000): round(v) for ts, v in trace.rows}
    assert {t: n for t, n in got.items() if t in want} == want
    assert sum(got.values()) == round(trace.total)
    # Every window sits on the partition its endpoint's murmur2 hash names.
    for m in msgs:
        for w in windows_of(codec, [m]):
            assert m.partition() == partition_for(w["endpoint_id"].encode(), 3)
    assert "replayed" in done.stderr and "0 failed" in done.stderr


def test_our_partitioner_matches_librdkafka(kafka: KafkaSettings) -> None:
    """Single keyed records placed by librdkafka land where partition_for says."""
    p = RecordProducer(kafka, "t-part")
    topic = topic_name(kafka, "telemetry")
    keys = [f"endpoint-{i}".encode() for i in range(60)]
    for k in keys:
        p.produce(topic, b"x", k)
    assert p.flush(10) == 0
    msgs = read_topic(kafka.bootstrap_servers, topic, min_records=60)
    assert len(msgs) == 60
    for m in msgs:
        assert m.partition() == partition_for(m.key() or b"", 3)


def test_bad_input_keeps_the_agent_publishing(kafka: KafkaSettings, codec: Codec) -> None:
    edge = build_agent(kafka, codec, agent_id="a-bad", region="r", host_stats=zero_host_stats,
                       interval_seconds=5)
    edge.record("good", 12.0, 200, at=1000.0)
    for bad in [("good", float("nan"), 200), ("", 1.0, 200), ("good", 1.0, 1000)]:
        with pytest.raises(TelemetryInputError):
            edge.record(*bad, at=1001.0)
    edge.record("good", 14.0, 200, at=1002.0)
    edge.tick(1005.0)
    assert edge.close(10) == 0
    windows = windows_of(codec, read_topic(kafka.bootstrap_servers,
                                           topic_name(kafka, "telemetry"), min_records=1))
    assert [(w["endpoint_id"], w["request_count"]) for w in windows] == [("good", 2)]


def test_broker_down_buffers_within_bound_and_counts_the_rest() -> None:
    """Nothing listens on the port: records queue up to the bound; the rest are counted."""
    from streams.kafka.broker import free_port

    s = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    p = RecordProducer(s, "t-down", max_buffered=10, delivery_timeout_s=1.0)
    accepted = [p.produce("loadcast.telemetry", b"v", b"k") for _ in range(25)]
    assert accepted.count(True) == 10 and p.stats.overflow == 15
    p.flush(5)
    assert p.stats.failed == 10  # never acknowledged: counted as delivery failures
    assert p.stats.sent + p.stats.overflow == 25


def test_module_entry_point_help() -> None:
    out = subprocess.run([sys.executable, "-m", "loadcast", "agent", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--replay" in out.stdout and "--interval" in out.stdout
