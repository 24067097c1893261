"""Reading a topic back to its end with a plain confluent-kafka consumer (assigned every
partition from offset 0; no consumer group is joined, nothing is committed)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition


def read_to_end(config: Mapping[str, Any], topic: str, *, timeout: float = 20.0,
                min_records: int = 0, idle: float | None = None, batch: int = 1000,
                poll_s: float = 0.5) -> list[Message]:
    """Every record of ``topic`` until each partition reported its end and at least
    ``min_records`` arrived; bounded by ``timeout`` and, when given, by ``idle`` seconds
    without a record (reading ``batch`` records at most per ``poll_s`` wait).
    ``config``: the consumer's properties (bootstrap servers, …)."""
    c = Consumer({**config, "enable.partition.eof": True})
    try:
        md = c.list_topics(topic, timeout=10)
        parts = list(md.topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        open_parts = set(parts)
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline and (open_parts or len(out) < min_records):
            if idle is not None and time.monotonic() - last >= idle:
                break
            for m in c.consume(batch, poll_s):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        open_parts.discard(m.partition())
                    continue
                open_parts.add(m.partition())  # more arrived after its end
                last = time.monotonic()
                out.append(m)
        return out
    finally:
        c.close()
