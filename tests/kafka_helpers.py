"""Reading topics back with a plain confluent-kafka consumer (no loadcast code)."""

from __future__ import annotations

from confluent_kafka import Message

from benchmarks.support.kafka_read import read_to_end


def read_topic(bootstrap: str, topic: str, timeout: float = 20.0,
               min_records: int = 0) -> list[Message]:
    """Every record of ``topic``, reading each partition from 0 to its end (bounded)."""
    return read_to_end({"bootstrap.servers": bootstrap, "group.id": "test-reader",
                        "enable.auto.commit": False},
                       topic, timeout=timeout, min_records=min_records)
