"""A bounded, observable Kafka producer (confluent-kafka) for loadcast records.

Idempotent, keyed with the Java-compatible murmur2 partitioner. While the broker is down,
records wait in librdkafka's buffer up to ``max_buffered`` records; what exceeds the bound
is refused, counted (``loadcast_producer_overflow_total``) and logged, never dropped
silently. Records the broker never acknowledges within ``delivery_timeout_s`` are counted
as delivery failures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from streams import metrics
from streams.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass
class ProducerStats:
    """What happened to the records handed to a producer."""

    sent: int = 0
    delivered: int = 0
    failed: int = 0
    overflow: int = 0


class RecordProducer:
    """Produce encoded values; counts sends, acks, failures and overflows."""

    def __init__(
        self,
        settings: KafkaSettings,
        client_id: str,
        *,
        max_buffered: int = 100_000,
        delivery_timeout_s: float = 300.0,
        linger_ms: float = 5.0,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.client_id = client_id
        self.max_buffered = max_buffered
        conf = settings.client_config()
        conf.update(
            {
                "client.id": client_id,
                "enable.idempotence": True,
                "partitioner": "murmur2_random",
                "linger.ms": linger_ms,
                "queue.buffering.max.messages": max_buffered,
                "message.timeout.ms": int(delivery_timeout_s * 1000),
            }
        )
        conf.update(extra or {})
        self._producer = Producer(conf)
        self.stats = ProducerStats()
        self._m_delivered = metrics.PRODUCER_DELIVERED.labels(client_id)
        self._m_failed = metrics.PRODUCER_FAILED.labels(client_id)
        self._m_overflow = metrics.PRODUCER_OVERFLOW.labels(client_id)
        self._m_queued = metrics.PRODUCER_QUEUED.labels(client_id)
        self._m_sent: dict[str, Any] = {}
        self._last_overflow_log = 0.0

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.stats.delivered += 1
            self._m_delivered.inc()
        else:
            self.stats.failed += 1
            self._m_failed.inc()
            log.error("delivery to %s failed: %s", msg.topic(), err)

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> bool:
        """Queue one record; False (and counted) when the buffer bound is full."""
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": self._on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        try:
            self._producer.produce(topic, **kwargs)
        except BufferError:
            # Serve delivery reports once (frees room if the broker is merely slow), then
            # give up on this record rather than block the caller.
            self._producer.poll(0)
            try:
                self._producer.produce(topic, **kwargs)
            except BufferError:
                self._overflowed(topic)
                return False
        self.stats.sent += 1
        m = self._m_sent.get(topic)
        if m is None:
            m = self._m_sent[topic] = metrics.PRODUCER_SENT.labels(self.client_id, topic)
        m.inc()
        return True

    def _overflowed(self, topic: str) -> None:
        self.stats.overflow += 1
        self._m_overflow.inc()
        now = time.monotonic()
        if now - self._last_overflow_log > 5.0:
            self._last_overflow_log = now
            log.warning(
                "producer %s buffer full (%d records): refusing records for %s; %d refused so far",
                self.client_id, self.max_buffered, topic, self.stats.overflow,
            )

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks."""
        n: int = self._producer.poll(timeout)
        self._m_queued.set(len(self._producer))
        return n

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding records; returns how many are still queued."""
        left: int = self._producer.flush(timeout)
        self._m_queued.set(left)
        return left

    def __len__(self) -> int:
        return len(self._producer)
