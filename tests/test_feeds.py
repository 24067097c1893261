"""The record feed (the sidecar's scores, the API's state) reads every record produced
after it was assigned, even one produced before its reader thread first polls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from schemas.codec import Codec
from streams.feeds import Batch, FeedTopic, RecordFeed
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from streams.sidecar.testing import score_record


def test_a_record_produced_right_after_assignment_is_read(kafka: KafkaSettings,
                                                          codec: Codec) -> None:
    p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 0})
    topic = topic_name(kafka, "load-scores")
    got: list[set[str]] = [set() for _ in range(8)]
    lock = threading.Lock()

    def deliver_to(i: int) -> Callable[[Batch], None]:
        def deliver(batch: Batch) -> None:
            with lock:
                got[i].update(rec["endpoint_id"] for _, rec in batch)
        return deliver

    feeds = []
    try:
        for i in range(8):  # empty partitions at first: each feed starts at their end
            feed = RecordFeed(kafka, codec, deliver_to(i), client_id=f"feed-{i}",
                              topics={"load-scores": FeedTopic(frozenset({"LoadScore"}), 0)})
            feeds.append(feed)
            feed._assign()
            # at once, before the feed polls
            for part in range(kafka.partitions):
                p.produce(topic, codec.encode("LoadScore", score_record(f"e{i}-{part}", 0.5)),
                          partition=part)
            assert p.flush(10) == 0
            feed._spawn()
        # feed i must see the records of round i (produced right after it was assigned)
        want = [{f"e{i}-{part}" for part in range(kafka.partitions)} for i in range(8)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with lock:
                if all(w <= g for w, g in zip(want, got, strict=True)):
                    break
            time.sleep(0.05)
        with lock:
            missed = sorted(set().union(*(w - g for w, g in zip(want, got, strict=True))))
        assert not missed, f"records never read by the feed assigned before them: {missed}"
    finally:
        for f in feeds:
            f.stop()


def test_a_flood_of_garbage_is_counted_not_logged_line_by_line(
        kafka: KafkaSettings, codec: Codec, caplog: pytest.LogCaptureFixture) -> None:
    p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 0})
    topic = topic_name(kafka, "load-scores")
    feed = RecordFeed(kafka, codec, lambda batch: None, client_id="feed-flood",
                      topics={"load-scores": FeedTopic(frozenset({"LoadScore"}), 60)})
    try:
        feed.start()
        for i in range(200):
            p.produce(topic, b"\x07garbage" + bytes([i]), b"k")
        assert p.flush(10) == 0
        deadline = time.monotonic() + 20
        while feed.skipped < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        feed.stop()
    assert feed.skipped == 200
    lines = [r for r in caplog.records if "skipping record" in r.getMessage()]
    assert 1 <= len(lines) <= 25, len(lines)  # about one a second, with a count
