"""Reading topics back with a plain confluent-kafka consumer (no loadcast code)."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition


def read_topic(bootstrap: str, topic: str, timeout: float = 20.0,
               min_records: int = 0) -> list[Message]:
    """Every record of ``topic``, reading each partition from 0 to its end (bounded)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-reader",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        md = c.list_topics(topic, timeout=10)
        parts = list(md.topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        open_parts = set(parts)
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (open_parts or len(out) < min_records):
            for m in c.consume(1000, 0.5):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        open_parts.discard(m.partition())
                    continue
                open_parts.add(m.partition())  # more arrived after EOF
                out.append(m)
        return out
    finally:
        c.close()
