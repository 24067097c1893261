"""Reading every partition of a topic to its end, without a consumer group.

A :class:`TopicReader` assigns the partitions of one topic from a start offset (0 by
default: read by Fetch, not ListOffsets, which some brokers undercount) with
``enable.partition.eof``, and keeps which partitions are at their end. It serves both a
one-shot read (:meth:`TopicReader.read_to_end`, which raises when the end is not reached
in time) and a reader kept open and refreshed (:meth:`TopicReader.read`, which stops
quietly at its deadline), e.g. the global model repository.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

log = logging.getLogger(__name__)


class TopicReader:
    """The partitions of ``topic`` (all, or ``partitions``) assigned from ``start``.

    ``follow``: a record arriving after a partition's end reopens it (a reader kept
    open); without, a partition once at its end stays there (a one-shot read).
    Raises ``KeyError`` (and closes the consumer) when the topic does not exist.
    """

    def __init__(self, consumer: Consumer, topic: str, *,
                 partitions: Sequence[int] | None = None, start: int = 0,
                 follow: bool = False, metadata_timeout: float = 10.0) -> None:
        self.consumer = consumer
        self.topic = topic
        self.follow = follow
        if partitions is None:
            md = consumer.list_topics(topic, timeout=metadata_timeout)
            t = md.topics.get(topic)
            if t is None or t.error is not None:
                consumer.close()
                raise KeyError(f"topic {topic} does not exist (run `loadcast topics ensure`)")
            partitions = sorted(t.partitions)
        self.partitions = list(partitions)
        consumer.assign([TopicPartition(topic, p, start) for p in self.partitions])
        self._at_end: set[int] = set()
        self._closed = False

    @property
    def at_end(self) -> bool:
        """Every partition reached its end (and, when following, got nothing since)."""
        return len(self._at_end) >= len(self.partitions)

    def batch(self, wait: float, max_records: int = 500) -> list[Message]:
        """One fetch: the records it returned (ends of partitions noted, errors logged)."""
        out: list[Message] = []
        for m in self.consumer.consume(max_records, wait):
            err, part = m.error(), m.partition() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._at_end.add(part)
                else:
                    log.warning("reading %s: %s", self.topic, err)
                continue
            if self.follow:
                self._at_end.discard(part)
            out.append(m)
        return out

    def read(self, timeout: float, max_records: int = 500) -> Iterator[Message]:
        """Records until every partition is at its end, or ``timeout`` seconds (at least
        one fetch either way; stops quietly at the deadline)."""
        deadline = time.monotonic() + timeout
        first = True
        while first or (not self.at_end and time.monotonic() < deadline):
            first = False
            wait = max(0.0, min(0.2, deadline - time.monotonic()))
            yield from self.batch(wait, max_records)

    def read_to_end(self, timeout: float, max_records: int = 1000) -> Iterator[Message]:
        """Records until every partition is at its end; ``TimeoutError`` if that takes
        longer than ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.at_end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {self.topic} did not reach its end in {timeout}s")
            yield from self.batch(0.2, max_records)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
