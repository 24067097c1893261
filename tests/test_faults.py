"""Hostile input (issue 15, items 1, 2, 3, 6, 7): one real worker, sink and sidecar on the
embedded broker, fed what a hostile producer would send; each test checks what users see
(dead letters with reasons, scores and rows that still arrive, /health)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message

from benchmarks.faults import Stack, headers, load_score, producer, read_all
from benchmarks.support.records import INTERVAL_MS, window
from processors.endpoint import ProcessorConfig
from processors.engine import Engine
from schemas.codec import Codec
from schemas.validation import reference_ms
from streams.kafka.broker import EmbeddedBroker
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import ensure_topics, topic_name

pytestmark = pytest.mark.slow

ENDPOINTS = ["e1", "e2", "e3", "e4"]
PER_API = 20  # the worker's max_endpoints_per_api in this suite
BIG = 1_000_000 - 4096  # about 1 MB: fits a produce, not a copy with dead-letter headers


@pytest.fixture(scope="module")
def stack(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap,
                          topic_prefix=f"f{uuid.uuid4().hex[:8]}.", partitions=3)
    ensure_topics(kafka)
    s = Stack(kafka, tmp_path_factory.mktemp("faults"), ENDPOINTS, worker_env={
        "LOADCAST_PROCESSOR__MAX_ENDPOINTS_PER_API": str(PER_API),
        "LOADCAST_PROCESSOR__MAX_ENDPOINTS": "200",
    })
    s.start()
    try:
        s.wait_ready(120)
        yield s
    finally:
        codes = s.stop()
        assert all(c == 0 for c in codes.values()), (codes, s.log_tail("worker"))


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec.embedded()


def base_ms() -> int:
    return (reference_ms() // 60_000) * 60_000 - 3 * 3_600_000


def send(kafka: KafkaSettings, short: str, records: list[tuple[bytes | None, bytes | None]]
         ) -> list[tuple[int, int]]:
    """Produce in order; the (partition, offset) of each record."""
    p = producer(kafka)
    where: dict[int, tuple[int, int]] = {}
    for i, (key, value) in enumerate(records):
        def cb(err: Any, msg: Message, i: int = i) -> None:
            assert err is None, err
            where[i] = (msg.partition() or 0, msg.offset() or 0)
        p.produce(topic_name(kafka, short), value=value, key=key, on_delivery=cb)
        p.flush(30)  # one at a time: the order across partitions is the order given
    return [where[i] for i in range(len(records))]


def wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def letters(stack: Stack, short: str, where: tuple[int, int]) -> dict[str, Message]:
    """Dead letters of the record at ``where`` of topic ``short``, by consumer."""
    topic = topic_name(stack.kafka, short)
    out = {}
    for m in read_all(stack.kafka, "dead-letter", timeout=10, idle=0.5):
        h = headers(m)
        if (h.get("loadcast.source_topic"), h.get("loadcast.partition"),
                h.get("loadcast.offset")) == (topic, str(where[0]), str(where[1])):
            who = h.get("loadcast.consumer", "?")
            kind = ("worker" if who.startswith(stack.app_id) else "sink"
                    if who.startswith("loadcast-sink") else "sidecar"
                    if who.startswith("sidecar") else who)
            out[kind] = m
    return out


def worker_letters(stack: Stack, short: str, where: set[tuple[int, int]]) -> list[Message]:
    """The worker's dead letters of the records of topic ``short`` at any of ``where``."""
    topic = topic_name(stack.kafka, short)
    out = []
    for m in read_all(stack.kafka, "dead-letter", timeout=10, idle=0.5):
        h = headers(m)
        at = (h.get("loadcast.partition"), h.get("loadcast.offset"))
        if h.get("loadcast.source_topic") == topic \
                and h.get("loadcast.consumer", "").startswith(stack.app_id) \
                and (int(at[0] or -1), int(at[1] or -1)) in where:
            out.append(m)
    return out


def stored(stack: Stack, table: str, where: str) -> int:
    rows = stack.sql(f"SELECT count() FROM {table} WHERE {where}")
    return int(rows[0][0]) if rows else 0


def healthy(stack: Stack) -> None:
    assert all(stack.health().values()), (stack.health(), stack.log_tail("worker"),
                                          stack.log_tail("sink"), stack.log_tail("sidecar"))


def test_a_1mb_record_is_dead_lettered_as_a_reference_and_stops_nothing(
    stack: Stack, codec: Codec
) -> None:
    k, now = stack.kafka, reference_ms()
    (big_t,) = send(k, "telemetry", [(b"e1", b"\x00\x00\x00\x00\x01" + b"\xff" * BIG)])
    (big_s,) = send(k, "load-scores", [(b"e2", b"\x07" * BIG)])
    after = window("after-big", 0, base_ms())
    send(k, "telemetry", [(b"after-big", codec.encode("EndpointTelemetry", after))])
    send(k, "load-scores", [(b"e2", codec.encode("LoadScore", load_score("e2", now, 0.77)))])

    # Scoring and storing go on after the record: the later window is scored and stored,
    # and the sidecar applies the later score.
    wait(lambda: stored(stack, "load_scores", "endpoint_id = 'after-big'"), 30,
         "a score of the window after the 1 MB record")
    assert stored(stack, "telemetry", "endpoint_id = 'after-big'") == 1
    scores = wait(lambda: stack.sidecar("/weights")["orders"]["scores"].get("e2"), 15,
                  "the sidecar to apply the score after the 1 MB record")
    assert scores["computed_at"] == now
    # Each consumer dead-lettered it as a reference: size, reason, bounded prefix.
    got = wait(lambda: (d := letters(stack, "telemetry", big_t)).keys() >= {"worker", "sink"}
               and d, 20, "dead letters of the 1 MB telemetry record")
    got_s = wait(lambda: (d := letters(stack, "load-scores", big_s)).keys() >= {"sidecar"}
                 and d, 20, "the sidecar's dead letter of the 1 MB score")
    for m in [*got.values(), got_s["sidecar"]]:
        h = headers(m)
        assert h["loadcast.value_truncated"] == "prefix"
        assert int(h["loadcast.value_size"]) >= BIG
        assert h["loadcast.reason"]
        assert len(m.value() or b"") <= 4096
    healthy(stack)


def test_a_window_spanning_years_is_dead_lettered_and_does_not_hang_the_worker(
    stack: Stack, codec: Codec
) -> None:
    k, base = stack.kafka, base_ms()
    w = window("span-1", 0, base)
    huge = {**w, "window_end": w["window_start"] + 795 * 86_400_000}  # the bit-flipped end
    (where,) = send(k, "telemetry", [(b"span-1", codec.encode("EndpointTelemetry", huge))])
    send(k, "telemetry", [(b"span-1", codec.encode("EndpointTelemetry", window("span-1", 1,
                                                                                base)))])
    # The window after it is scored within seconds (229,000 steps would take minutes).
    wait(lambda: stored(stack, "load_scores", "endpoint_id = 'span-1'"), 20,
         "a score of the window after the huge span")
    got = wait(lambda: (d := letters(stack, "telemetry", where)).keys() >= {"worker", "sink"}
               and d, 20, "dead letters of the huge span")
    for m in got.values():
        h = headers(m)
        assert h["loadcast.reason"] == "bad_window"
        assert "max_window_seconds" in h["loadcast.detail"]
    assert stored(stack, "telemetry", "endpoint_id = 'span-1'") == 1
    healthy(stack)


def test_a_score_from_the_future_is_refused_and_locks_nothing(
    stack: Stack, codec: Codec
) -> None:
    from processors.apps.mirror_settings import MirrorSettings
    from processors.apps.planner import Planner
    from processors.signing import generate_keypair

    k, now = stack.kafka, reference_ms()
    future = load_score("e3", now + 4 * 365 * 86_400_000, 0.01)
    genuine = load_score("e3", now, 0.66)
    (where, _) = send(k, "load-scores", [
        (b"e3", codec.encode("LoadScore", future)), (b"e3", codec.encode("LoadScore", genuine))])
    s = wait(lambda: stack.sidecar("/weights")["orders"]["scores"].get("e3"), 15,
             "the sidecar to apply the genuine score")
    assert s["computed_at"] == now and s["score"] == 0.66
    got = wait(lambda: (d := letters(stack, "load-scores", where)).keys() >= {"sidecar", "sink"}
               and d, 20, "dead letters of the future score")
    for m in got.values():
        assert headers(m)["loadcast.reason"] == "clock_skew"
        assert "in the future" in headers(m)["loadcast.detail"]
    wait(lambda: stored(stack, "load_scores", "endpoint_id = 'e3' AND score = 0.66"), 15,
         "the sink to store the genuine score")
    assert stored(stack, "load_scores", "endpoint_id = 'e3' AND score = 0.01") == 0

    # The planner (a processor reading scores) refuses it too, and keeps the genuine one.
    planner = Planner(k, MirrorSettings(signing_key=generate_keypair()[0]),
                      Codec.embedded(), restore=False)
    try:
        planner.handle_score(b"e3", codec.encode("LoadScore", future))
        planner.handle_score(b"e3", codec.encode("LoadScore", genuine))
        held = planner.logic.demand._scores[("orders", "eu")]["e3"]
        assert held.computed_at == now
        assert planner.dead_letters.stats.by_reason == {"clock_skew": 1}
    finally:
        planner.close()
    healthy(stack)


def test_garbage_endpoint_ids_are_capped_per_api_and_counted(
    stack: Stack, codec: Codec
) -> None:
    k, base = stack.kafka, base_ms()
    junk = [window(f"junk-{uuid.uuid4().hex[:12]}", 0, base, api="junk")
            for _ in range(PER_API + 10)]
    real = window("real-after-junk", 0, base)
    where = send(k, "telemetry", [(w["endpoint_id"].encode(),
                                   codec.encode("EndpointTelemetry", w)) for w in junk])
    send(k, "telemetry", [(b"real-after-junk", codec.encode("EndpointTelemetry", real))])
    wait(lambda: stack.worker_metric("loadcast_processor_dead_letters_total",
                                     reason="endpoint_cap") >= 10, 20, "the cap metric")
    assert stack.worker_metric("loadcast_processor_endpoints") <= 200
    # 10 of them (over the cap of 20 for api "junk") are dead-lettered with a reason: which
    # 10 depends on the order the worker took its 3 partitions in, not on the order sent.
    got = wait(lambda: len(d := worker_letters(stack, "telemetry", set(where))) >= 10 and d,
               20, "the dead letters of the models over the cap")
    assert len(got) == 10
    for m in got:
        h = headers(m)
        assert h["loadcast.reason"] == "endpoint_cap"
        assert "max_endpoints_per_api (20)" in h["loadcast.detail"]
    # Another api's endpoint still gets its model and its scores.
    wait(lambda: stored(stack, "load_scores", "endpoint_id = 'real-after-junk'"), 20,
         "a score of a real endpoint after the junk")
    healthy(stack)


def test_idle_models_are_evicted_first_to_make_room(codec: Codec) -> None:
    class Out:
        def __init__(self) -> None:
            self.dead: list[tuple[str, str]] = []

        def score(self, endpoint_id: str, value: bytes) -> None: ...

        def anomaly(self, endpoint_id: str, value: bytes) -> None: ...

        def dead_letter(self, key: bytes | None, value: bytes, reason: str, detail: str,
                        partition: int, offset: int) -> None:
            self.dead.append((reason, detail))

    out = Out()
    e = Engine(ProcessorConfig(max_endpoints=3, max_endpoints_per_api=10,
                               endpoint_idle_seconds=900), codec, out)
    base = base_ms()

    def feed(offset: int, endpoint: str, now: float) -> None:
        e.handle(0, offset, None, codec.encode("EndpointTelemetry",
                                               window(endpoint, offset, base)), now=now)

    for i, ep in enumerate(["a", "b", "c"]):
        feed(i, ep, now=1000.0 + i)
    feed(3, "d", now=1500.0)  # nobody idle for 900 s: refused
    assert out.dead[-1][0] == "endpoint_cap" and e.endpoints() == 3
    feed(4, "b", now=1950.0)  # b is busy again; a has been idle longest
    feed(5, "d", now=1950.0)
    assert sorted(e.partitions[0].models) == ["b", "c", "d"] and e.stats.evicted == 1
    taken = e.begin_snapshot(0)
    assert taken is not None and "a" in taken[0]  # a tombstone goes to the snapshot topic
    assert e.snapshot_record(0, "a") is not None
    rec = e.snapshot_record(0, "a")
    assert rec is not None and rec.value is None


def test_worker_and_sink_reject_the_same_records_with_the_same_reason(
    stack: Stack, codec: Codec
) -> None:
    k, base = stack.kafka, base_ms()
    w = window("agree-1", 0, base)
    lax = Codec(Codec.embedded().ids, validate_on_encode=False)
    bad = [
        {**w, "window_end": w["window_start"]},  # ends when it starts
        {**w, "window_end": w["window_start"] - 60_000},  # ends before it starts
        {**w, "window_start": reference_ms() + 3_600_000,
         "window_end": reference_ms() + 3_660_000},  # ends an hour from now
        {**w, "window_start": -10**15, "window_end": -10**15 + 60_000},  # before 1900
    ]
    where = send(k, "telemetry", [(b"agree-1", lax.encode("EndpointTelemetry", b))
                                  for b in bad])
    (null,) = send(k, "telemetry", [(b"agree-1", None)])  # a null value: not skipped
    send(k, "telemetry", [(b"agree-1", codec.encode("EndpointTelemetry", window(
        "agree-1", 1, base)))])
    for at, reason in zip([*where, null],
                          ["bad_window", "bad_window", "clock_skew", "bad_window", "invalid"],
                          strict=True):
        def both(at: tuple[int, int] = at) -> Any:
            d = letters(stack, "telemetry", at)
            return d.keys() >= {"worker", "sink"} and d

        got = wait(both, 20, f"both dead letters of {at}")
        assert {headers(m)["loadcast.reason"] for m in got.values()} == {reason}, at
    wait(lambda: stored(stack, "telemetry", "endpoint_id = 'agree-1'"), 15, "the valid one")
    assert stored(stack, "telemetry", "endpoint_id = 'agree-1'") == 1
    assert stored(stack, "telemetry", f"endpoint_id = 'agree-1' AND window_start = "
                  f"fromUnixTimestamp64Milli({base + INTERVAL_MS})") == 1
    healthy(stack)


def test_one_bad_window_of_a_batch_loses_none_of_the_others(stack: Stack,
                                                          codec: Codec) -> None:
    k, base = stack.kafka, base_ms()
    ws = [window("mixed-1", i, base) for i in range(3)]
    ws[1] = {**ws[1], "window_end": ws[1]["window_start"] - 60_000}  # ends before it starts
    lax = Codec(Codec.embedded().ids, validate_on_encode=False)
    batch = lax.encode("TelemetryBatch", {"agent_id": "a1", "region": "eu",
                                          "created_at": base, "windows": ws})
    (at,) = send(k, "telemetry", [(b"mixed-1", batch)])

    def both() -> Any:
        d = letters(stack, "telemetry", at)
        return d.keys() >= {"worker", "sink"} and d

    got = wait(both, 20, "the bad window's dead letters")
    for m in got.values():  # the window alone, as a single EndpointTelemetry
        assert headers(m)["loadcast.reason"] == "bad_window"
        alone = codec.decode(m.value(), validate=False)
        assert alone["window_start"] == ws[1]["window_start"] and "windows" not in alone
    wait(lambda: stored(stack, "telemetry", "endpoint_id = 'mixed-1'") == 2, 15,
         "the batch's two good windows")
    healthy(stack)


def test_sidecar_score_reader_that_dies_makes_health_503_and_is_restarted(
    tmp_path: Path, codec: Codec
) -> None:
    from streams.sidecar.scores import ScoreSubscriber

    # In-process: the thread is killed by a fault nothing catches (a bug), then supervised.
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix="x.")
    sub = ScoreSubscriber(kafka, codec, lambda batch: None, sidecar_id="t")

    def boom() -> None:
        raise RuntimeError("a bug")

    sub._run = boom  # type: ignore[method-assign]
    sub._spawn()
    wait(lambda: not sub.alive(), 5, "the thread to die")
    assert sub.crashes == 1
    assert not sub.supervise(restart_after_s=60)  # not yet: backs off
    def idle() -> None:
        sub._stop.wait(30)

    sub._run = idle  # type: ignore[method-assign]
    assert sub.supervise(restart_after_s=0)
    assert sub.alive()
    sub._stop.set()
    sub.stop()
