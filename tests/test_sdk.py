"""The user SDK on the real broker: TelemetryProducer and DecisionConsumer."""

from __future__ import annotations

from typing import Any

from schemas.codec import Codec
from schemas.records import LoadScore, RoutingDecision
from streams.kafka.producer import RecordProducer
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from streams.sdk import DecisionConsumer, TelemetryProducer
from tests.kafka_helpers import read_topic
from tests.test_codec import telemetry


def score(endpoint: str, value: float, at: int) -> dict[str, Any]:
    return {
        "endpoint_id": endpoint, "api": "orders", "region": "eu", "computed_at": at,
        "valid_until": at + 30_000, "score": value, "capacity_rps": 100.0,
        "capacity_source": "CONFIGURED", "current_rps": 50.0, "predicted_utilization": 0.5,
        "latency_p99_ms": 80.0, "error_rate": 0.0, "anomaly_score": 0.0, "step_seconds": 60,
        "forecast": [{"horizon": 1, "at": at + 60_000, "mean": 55.0, "lower": 40.0,
                      "upper": 70.0}],
        "model": "default", "reasons": [],
    }


def test_telemetry_producer_places_like_the_agent(kafka: KafkaSettings, codec: Codec) -> None:
    with TelemetryProducer(kafka) as tp:
        for i in range(12):
            assert tp.send(telemetry(endpoint_id=f"e{i}"))  # type: ignore[arg-type]
    msgs = read_topic(kafka.bootstrap_servers, topic_name(kafka, "telemetry"), min_records=12)
    assert sorted(codec.decode(m.value() or b"")["endpoint_id"] for m in msgs) == sorted(
        f"e{i}" for i in range(12))


def test_decision_consumer_typed_latest_and_skips_garbage(
    kafka: KafkaSettings, codec: Codec
) -> None:
    p = RecordProducer(kafka, "t-scores")
    topic = topic_name(kafka, "load-scores")
    p.produce(topic, codec.encode("LoadScore", score("e1", 0.9, 1000)), b"e1")
    p.produce(topic, b"\x00garbage", b"e1")
    p.produce(topic, codec.encode("LoadScore", score("e1", 0.2, 2000)), b"e1")
    p.produce(topic, codec.encode("LoadScore", score("e2", 0.7, 1500)), b"e2")
    decision = {"sidecar_id": "s1", "region": "eu", "api": "orders", "at": 5, "kind": "WEIGHTS",
                "policy": "predictive", "stale": False, "weights": {"e1": 0.3},
                "previous_weights": {}, "scores": {"e1": 0.2}}
    p.produce(topic_name(kafka, "routing-decisions"),
              codec.encode("RoutingDecision", decision), b"s1")
    assert p.flush(10) == 0
    with DecisionConsumer(kafka) as dc:
        latest = dc.latest_scores(timeout=15)
        assert dc.skipped == 1
    assert set(latest) == {"e1", "e2"}
    assert isinstance(latest["e1"], LoadScore) and latest["e1"].score == 0.2
    assert latest["e1"].forecast[0].mean == 55.0
    assert latest["e1"].is_stale(now_ms=2000 + 30_001)
    with DecisionConsumer(kafka, group_id="g-test") as dc:
        seen = []
        for _ in range(40):
            d = dc.poll(0.5)
            if d is not None:
                seen.append(d)
            if len(seen) == 4:
                break
    assert sum(isinstance(d, RoutingDecision) for d in seen) == 1
    assert sum(isinstance(d, LoadScore) for d in seen) == 3
