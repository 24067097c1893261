"""The forecasting worker (Faust) against the real embedded broker."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from processors.endpoint import ProcessorConfig
from processors.engine import Engine
from schemas.codec import Codec
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from tests.kafka_helpers import read_topic
from tests.worker_helpers import (
    STEP,
    final_models,
    make_windows,
    new_app_id,
    produce,
    scores,
    start_worker,
    stop,
    wait_for_checkpoints,
)


class ListOutputs:
    def __init__(self) -> None:
        self.scores: list[bytes] = []

    def score(self, endpoint_id: str, value: bytes) -> None:
        self.scores.append(value)

    def anomaly(self, endpoint_id: str, value: bytes) -> None:
        pass

    def dead_letter(self, *args: object) -> None:
        pass


def test_telemetry_in_scores_out(kafka: KafkaSettings, codec: Codec, tmp_path: Path) -> None:
    endpoints = ["orders-a", "orders-b", "orders-c"]
    ends = produce(kafka, codec, make_windows(endpoints, 0, 120))
    w = start_worker(kafka, new_app_id(), tmp_path / "w.log")
    try:
        wait_for_checkpoints(kafka, codec, ends, proc=w)
    finally:
        stop(w)
    got = scores(kafka, codec)
    assert {s["endpoint_id"] for s in got} == set(endpoints)
    for s in got:
        assert 0.0 <= s["score"] <= 1.0 and s["api"] == "orders" and s["step_seconds"] == STEP
        assert len(s["forecast"]) == 15
        assert all(0 <= p["lower"] <= p["mean"] <= p["upper"] for p in s["forecast"])
        assert s["valid_until"] > s["computed_at"]
    late = [s for s in got if s["model"] == "default"]
    assert late, "after the first steps the real forecaster is used"
    # Publishing is selective: fewer scores than windows, but every endpoint kept fresh.
    assert len(got) < 3 * 120


def test_kill_9_mid_stream_loses_and_repeats_nothing(
    kafka: KafkaSettings, codec: Codec, tmp_path: Path
) -> None:
    endpoints = [f"api-{i}" for i in range(4)]
    first, second = make_windows(endpoints, 0, 700), make_windows(endpoints, 700, 700)
    app_id = new_app_id()
    w = start_worker(kafka, app_id, tmp_path / "w.log")
    ends: dict[int, int] = {}

    def trickle() -> None:  # the second half arrives while the worker is killed
        for i in range(0, len(second), 200):
            for p, o in produce(kafka, codec, second[i : i + 200]).items():
                ends[p] = max(ends.get(p, -1), o)
            time.sleep(0.15)

    try:
        wait_for_checkpoints(kafka, codec, produce(kafka, codec, first), proc=w)
        feeder = threading.Thread(target=trickle)
        feeder.start()
        time.sleep(0.7)
    finally:
        stop(w, signal.SIGKILL)
    feeder.join(60)
    cut = {e: m.windows for e, m in final_models(kafka, codec).items()}
    assert 700 * 4 <= sum(cut.values()) < 2 * 700 * 4, "the kill was not mid-stream"

    w = start_worker(kafka, app_id, tmp_path / "w2.log")
    try:
        wait_for_checkpoints(kafka, codec, ends, proc=w)
    finally:
        stop(w)
    after = final_models(kafka, codec)

    # The uninterrupted run: the same engine over the same records in partition order.
    reference = Engine(ProcessorConfig(step_seconds=STEP, anomaly_warmup=50), codec, ListOutputs())
    topic = topic_name(kafka, "telemetry")
    for m in sorted(read_topic(kafka.bootstrap_servers, topic),
                    key=lambda m: (m.partition(), m.offset())):
        reference.handle(m.partition() or 0, m.offset() or 0, m.key(), m.value(), now=0.0)
    ref = {e: m for s in reference.partitions.values() for e, m in s.models.items()}
    assert set(after) == set(endpoints)
    for e in endpoints:
        assert after[e].windows == 1400 == ref[e].windows  # none lost, none twice
        got = [p.mean for p in after[e].forecaster.forecast(15)]
        want = [p.mean for p in ref[e].forecaster.forecast(15)]
        assert got == want, e


def test_two_workers_share_and_survive_a_rebalance(
    kafka: KafkaSettings, codec: Codec, tmp_path: Path
) -> None:
    endpoints = [f"svc-{i}" for i in range(12)]
    app_id = new_app_id()
    ends = produce(kafka, codec, make_windows(endpoints, 0, 30))
    w1 = start_worker(kafka, app_id, tmp_path / "w1.log")
    w2 = start_worker(kafka, app_id, tmp_path / "w2.log")
    try:
        wait_for_checkpoints(kafka, codec, ends, proc=w1)
        assert {s["endpoint_id"] for s in scores(kafka, codec)} == set(endpoints)
        stop(w1, signal.SIGKILL)
        killed_at = time.time() * 1000
        ends = produce(kafka, codec, make_windows(endpoints, 30, 30))
        wait_for_checkpoints(kafka, codec, ends, timeout=120, proc=w2)
        fresh = {s["endpoint_id"] for s in scores(kafka, codec) if s["computed_at"] > killed_at}
        assert fresh == set(endpoints)
    finally:
        stop(w1, signal.SIGKILL)
        stop(w2)
    assert final_models(kafka, codec)["svc-0"].windows == 60


def test_bad_input_goes_to_dead_letter_and_scoring_goes_on(
    kafka: KafkaSettings, codec: Codec, tmp_path: Path
) -> None:
    lax = Codec(codec.ids, validate_on_encode=False)
    good = make_windows(["ok-1"], 0, 20)
    nan = dict(good[0], endpoint_id="bad-nan", latency_p99_ms=float("nan"))
    neg = dict(good[0], endpoint_id="bad-neg", request_count=-5)
    raw = [
        (b"junk", b"\x00\x01garbage"),
        (b"text", b"hello, not avro"),
        (b"short", b"\x00\x00"),
        (b"wrong-id", b"\x00\x00\x00\x27\x10" + b"x" * 20),
        (b"bad-nan", lax.encode("EndpointTelemetry", nan)),
        (b"bad-neg", lax.encode("EndpointTelemetry", neg)),
    ]
    ends = produce(kafka, codec, good[:10], raw)
    ends2 = produce(kafka, codec, good[10:])
    ends = {p: max(o, ends2.get(p, -1)) for p, o in ends.items()} | {
        p: o for p, o in ends2.items() if p not in ends}
    w = start_worker(kafka, new_app_id(), tmp_path / "w.log")
    try:
        wait_for_checkpoints(kafka, codec, ends, proc=w)
    finally:
        stop(w)
    dead = read_topic(kafka.bootstrap_servers, topic_name(kafka, "dead-letter"), min_records=6)
    reasons = {m.key(): str(dict(m.headers() or [])["loadcast.reason"], "utf-8")  # type: ignore[arg-type]
               for m in dead}
    assert reasons == {b"junk": "unknown_schema_id", b"wrong-id": "unknown_schema_id",
                       b"bad-nan": "out_of_range", b"bad-neg": "out_of_range",
                       b"text": "bad_magic", b"short": "truncated"}
    assert all(dict(m.headers() or [])["loadcast.error"] for m in dead)
    assert final_models(kafka, codec)["ok-1"].windows == 20
    assert {s["endpoint_id"] for s in scores(kafka, codec)} == {"ok-1"}


def test_a_partition_in_recovery_is_sought_again_when_faust_would_drop_its_records(
    codec: Codec,
) -> None:
    """Records fetched before the recovery seek reach the stream after it; Faust counts them
    as read and would drop the records from the resume offset on (a partition then waited
    forever, seen under load). The worker's recovery watch seeks again; only then."""
    import asyncio
    from types import SimpleNamespace

    from faust.types import TP

    from processors.apps.worker import reseek_stuck

    engine = Engine(ProcessorConfig(step_seconds=STEP), codec, ListOutputs())
    engine.hold(2)
    engine.restore(2, [], 0)  # no snapshot: resume at 0, recovering
    engine.hold(1)
    engine.restore(1, [], 0)
    engine.handle(1, 0, None, None)  # partition 1 got its first record: recovered
    seeks: list[tuple[TP, int]] = []

    async def seek(tp: TP, offset: int) -> None:
        seeks.append((tp, offset))
        read[tp] = offset or None  # what Faust's seek does

    read: dict[TP, int | None] = {TP("t", 2): 1399, TP("t", 1): 50}
    consumer = SimpleNamespace(_read_offset=read, seek=seek)
    asyncio.run(reseek_stuck(consumer, "t", engine))
    assert seeks == [(TP("t", 2), 0)]
    asyncio.run(reseek_stuck(consumer, "t", engine))
    assert len(seeks) == 1  # Faust's read offset is reset: nothing more to do
