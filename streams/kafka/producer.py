"""A bounded, observable Kafka producer (confluent-kafka) for loadcast records.

Idempotent, keyed with the Java-compatible murmur2 partitioner. While the broker is down,
records wait in librdkafka's buffer up to ``max_buffered`` records; what exceeds the bound
is refused, counted (``loadcast_producer_overflow_total``) and logged, never dropped
silently. Records the broker never acknowledges within ``delivery_timeout_s`` are counted
as delivery failures.

A broker that comes back without its storage (the embedded one restarted) no longer knows
the idempotent producer's id, and librdkafka retries forever. So when the process's broker
watch (:mod:`streams.kafka.brokerwatch`) sees the broker return without its topics, the producer
is replaced by a new one and every record still queued in the old one is produced again,
in order, on the new one: the buffer arrives.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streams import metrics
from streams.kafka.brokerwatch import watch
from streams.kafka.clients import new_producer
from streams.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)


#: After the broker returns, queued records none of which is acknowledged for this long
#: mean the producer is stuck (its id unknown to a broker that lost its state).
STUCK_S = 3.0


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
        self._conf = conf
        self._producer = new_producer(conf)
        self._next: Producer | None = None  # while re-sending an old producer's records
        self._reset_lock = threading.Lock()
        # one recovery at a time: a second thread that saw the same fatal error waits for
        # the first one's new producer instead of replacing it again
        self._recover_lock = threading.Lock()
        self.resent = 0
        # A fatal idempotence error (the broker lost its state and says "out of order
        # sequence"): librdkafka's producer is unusable; its records wait here for a new one.
        self._fatal = False
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self.stats = ProducerStats()
        self._m_delivered = metrics.PRODUCER_DELIVERED.labels(client_id)
        self._m_failed = metrics.PRODUCER_FAILED.labels(client_id)
        self._m_overflow = metrics.PRODUCER_OVERFLOW.labels(client_id)
        self._m_queued = metrics.PRODUCER_QUEUED.labels(client_id)
        self._m_sent: dict[str, Any] = {}
        self._last_overflow_log = 0.0
        watch(settings).on_return(self._broker_back, weak=True)

    def _broker_back(self, lost_log: bool) -> None:
        """The broker answers again. One that lost its state (the embedded one restarted
        empty) rejects the old producer id forever: if records are still queued and none
        is acknowledged for STUCK_S, move them to a new producer."""
        threading.Thread(target=self._unstick, name="producer-unstick", daemon=True).start()

    def _unstick(self) -> None:
        delivered, since = self.stats.delivered, time.monotonic()
        deadline = since + 60.0
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = time.monotonic()
            if len(self._producer) == 0 or self.stats.delivered != delivered:
                delivered, since = self.stats.delivered, now
            elif now - since >= STUCK_S:
                self.reset()
                return

    def reset(self, timeout: float = 10.0, *, quiet: bool = False) -> int:
        """Replace the librdkafka producer, re-producing what the old one still holds
        (purged there, produced again here in their order). Returns how many; ``quiet``:
        the caller logs the replacement (one line each)."""
        with self._reset_lock:
            old = self._producer
            new = new_producer(self._conf)
            self._next = new
            self._producer = new
            before = self.resent
            deadline = time.monotonic() + timeout
            try:
                while len(old) and time.monotonic() < deadline:
                    # A producer that hit a fatal error raises it once more from poll;
                    # the delivery reports after it still arrive on the next polls.
                    with contextlib.suppress(KafkaException):
                        old.purge(in_queue=True, in_flight=True, blocking=False)
                    with contextlib.suppress(KafkaException):
                        old.poll(0.1)  # delivery reports: purged records go to ``new``
            finally:
                self._next = None
            n = self.resent - before
            if (n or len(old)) and not quiet:
                log.warning("producer %s: broker lost its state; %d buffered records sent "
                            "again on a new producer%s", self.client_id, n,
                            f", {len(old)} could not be" if len(old) else "")
            return n

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        nxt = self._next
        if err is not None and (nxt is not None or self._fatal or err.fatal()
                                or err.code() in _STATE_LOST):
            kwargs: dict[str, Any] = {"key": msg.key(), "value": msg.value(),
                                      "on_delivery": self._on_delivery}
            if (msg.partition() or 0) >= 0:
                kwargs["partition"] = msg.partition()
            if msg.headers():
                kwargs["headers"] = msg.headers()
            if nxt is None:  # fatal: keep it for the producer that replaces this one
                self._fatal = True
                self._pending.append((msg.topic() or "", kwargs))
                return
            try:
                nxt.produce(msg.topic() or "", **kwargs)
                self.resent += 1
                return
            except BufferError:
                pass  # counted as failed below
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
        if self._fatal:
            self._recover()
        try:
            try:
                self._producer.produce(topic, **kwargs)
            except KafkaException as e:
                if not _is_fatal(e):
                    raise
                self._fatal = True
                self._recover()
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

    def _recover(self) -> None:
        """Replace a producer that hit a fatal error; its records go to the new one."""
        with self._recover_lock:
            with self._reset_lock:
                if not self._fatal:
                    return  # another thread recovered meanwhile
            n = self.reset(quiet=True)
            with self._reset_lock:
                pending, self._pending, self._fatal = self._pending, [], False
            for topic, kwargs in pending:
                try:
                    self._producer.produce(topic, **kwargs)
                    self.resent += 1
                    n += 1
                except BufferError:
                    self._overflowed(topic)
            log.warning("producer %s: fatal error from a broker that lost its state; "
                        "continuing on a new producer, %d buffered records sent again",
                        self.client_id, n)

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks."""
        if self._fatal:
            self._recover()
        n: int = self._producer.poll(timeout)
        self._m_queued.set(len(self._producer))
        return n

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding records; returns how many are still queued."""
        deadline = time.monotonic() + timeout
        while True:
            if self._fatal:
                self._recover()
            producer = self._producer
            left: int = producer.flush(max(0.0, deadline - time.monotonic()))
            # replaced meanwhile (records moved to a new producer): wait for that one
            if (producer is self._producer and not self._fatal) or time.monotonic() >= deadline:
                break
        if producer is not self._producer:
            left = len(self._producer)
        self._m_queued.set(left)
        return left

    def __len__(self) -> int:
        if self._pending:
            return len(self._producer) + len(self._pending)
        return len(self._producer)


#: Delivery errors that mean the broker no longer knows this producer's id or sequence (it
#: came back without its state): the producer is replaced and the record sent again, as
#: for a fatal error. Seen after a 20 s outage of the embedded broker: PRODUCER_FENCED on
#: every score, each logged and lost.
_STATE_LOST = frozenset({
    KafkaError._FATAL, KafkaError.PRODUCER_FENCED, KafkaError.UNKNOWN_PRODUCER_ID,
    KafkaError.INVALID_PRODUCER_EPOCH, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
})


def _is_fatal(e: KafkaException) -> bool:
    err = e.args[0] if e.args else None
    return isinstance(err, KafkaError) and (err.fatal() or err.code() in _STATE_LOST)
