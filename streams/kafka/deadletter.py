"""The one dead-letter writer every loadcast consumer uses (worker, sink, sidecar, planner,
executor, coordinator).

A dead letter is the original key and value with ``loadcast.*`` headers saying why and
where from: ``loadcast.reason``, ``loadcast.detail`` (also as ``loadcast.error``),
``loadcast.source_topic``, ``loadcast.partition``, ``loadcast.offset`` and
``loadcast.consumer`` (who dead-lettered it; the writer's client id unless given).

A value too large to be re-sent (a ~1 MB record plus headers does not fit the broker's
message size) goes as a **reference** instead of a copy that cannot fit: the value is its
first ``prefix_bytes`` bytes, and headers ``loadcast.value_size`` (the original size) and
``loadcast.value_truncated`` (``prefix``) say so; topic, partition and offset find the
original. Every producer error on this path (``MSG_SIZE_TOO_LARGE`` and other
``KafkaException``\\ s, ``BufferError``) is caught: the letter is retried once as a
reference, and if that fails too it is counted
(``loadcast_dead_letter_failures_total{client,error}``) and logged — never raised into the
consumer loop.

>>> class Sent(list):
...     def produce(self, topic, value=None, key=None, headers=None):
...         self.append((topic, len(value), dict(headers)["loadcast.reason"]))
>>> sent = Sent()
>>> w = DeadLetterWriter(sent, "dlq", client="doc", max_value_bytes=100, prefix_bytes=10)
>>> w.send(b"k", b"x" * 5000, reason="invalid", detail="junk", source_topic="t",
...        partition=0, offset=7)
True
>>> sent
[('dlq', 10, b'invalid')]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from prometheus_client import Counter

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter("loadcast_dead_letters_written_total",
                       "Records handed to the dead-letter topic", ["client", "reason"])
DEAD_LETTER_REFERENCES = Counter(
    "loadcast_dead_letter_references_total",
    "Dead letters sent as a reference (bounded prefix) because the value was too large",
    ["client"])
DEAD_LETTER_FAILURES = Counter(
    "loadcast_dead_letter_failures_total",
    "Dead letters the producer refused (after the retry as a reference)", ["client", "error"])

#: Values (plus key) above this go as a reference. Far below librdkafka's and Kafka's
#: default 1 MB message limit, far above any genuine loadcast record.
MAX_VALUE_BYTES = 256 * 1024
PREFIX_BYTES = 256
MAX_KEY_BYTES = 1024
MAX_DETAIL_BYTES = 1000

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class DeadLetter:
    """One record bound for the dead-letter topic (already bounded in size)."""

    key: bytes | None
    value: bytes
    headers: Headers
    reason: str


@dataclass
class DeadLetterStats:
    sent: int = 0
    references: int = 0
    failed: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


def letter(key: bytes | None, value: bytes | None, *, reason: str, detail: str,
           source_topic: str, partition: int | None, offset: int | None,
           consumer: str | None = None, max_value_bytes: int = MAX_VALUE_BYTES,
           prefix_bytes: int = PREFIX_BYTES) -> DeadLetter:
    """The dead letter for one record: the value as is, or a reference when too large."""
    value = value or b""
    detail_b = detail.encode(errors="replace")[:MAX_DETAIL_BYTES]
    headers: Headers = [
        ("loadcast.reason", reason.encode()),
        ("loadcast.detail", detail_b),
        ("loadcast.error", detail_b),
        ("loadcast.source_topic", source_topic.encode()),
        ("loadcast.partition", str(-1 if partition is None else partition).encode()),
        ("loadcast.offset", str(-1 if offset is None else offset).encode()),
    ]
    if consumer:
        headers.append(("loadcast.consumer", consumer.encode()))
    if key is not None and len(key) > MAX_KEY_BYTES:
        headers.append(("loadcast.key_size", str(len(key)).encode()))
        key = key[:MAX_KEY_BYTES]
    if len(value) + len(key or b"") > max_value_bytes:
        return _reference(key, value, headers, reason, prefix_bytes)
    return DeadLetter(key, value, headers, reason)


def _reference(key: bytes | None, value: bytes, headers: Headers, reason: str,
               prefix_bytes: int) -> DeadLetter:
    size = next((int(v) for k, v in headers if k == "loadcast.value_size"), len(value))
    out = [h for h in headers if h[0] not in ("loadcast.value_size", "loadcast.value_truncated")]
    out += [("loadcast.value_size", str(size).encode()),
            ("loadcast.value_truncated", b"prefix")]
    return DeadLetter(key, value[:prefix_bytes], out, reason)


class LogThrottle:
    """At most one log line a second for a flood of dead letters, with the count of those
    not logged (every one is in dead-letter with its reason, and counted by reason).

    >>> t = LogThrottle(every_s=60)
    >>> [t.due() for _ in range(3)]
    [1, 0, 0]
    """

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._at = -float("inf")
        self._since = 0

    def due(self) -> int:
        """0 while quiet; else the number of dead letters this line speaks for."""
        self._since += 1
        now = time.monotonic()
        if now - self._at < self.every_s:
            return 0
        n, self._at, self._since = self._since, now, 0
        return n


class DeadLetterWriter:
    """Produce dead letters with any producer that has ``produce(topic, value=, key=,
    headers=)`` (confluent-kafka's ``Producer`` or :class:`streams.kafka.producer.RecordProducer`,
    whose ``produce`` returns False when its buffer bound refused the record)."""

    def __init__(self, producer: Any, topic: str, *, client: str,
                 max_value_bytes: int = MAX_VALUE_BYTES,
                 prefix_bytes: int = PREFIX_BYTES) -> None:
        self.producer = producer
        self.topic = topic
        self.client = client
        self.max_value_bytes = max_value_bytes
        self.prefix_bytes = prefix_bytes
        self.stats = DeadLetterStats()
        self._last_log = 0.0

    def letter(self, key: bytes | None, value: bytes | None, *, reason: str, detail: str,
               source_topic: str, partition: int | None, offset: int | None,
               consumer: str | None = None) -> DeadLetter:
        return letter(key, value, reason=reason, detail=detail, source_topic=source_topic,
                      partition=partition, offset=offset, consumer=consumer or self.client,
                      max_value_bytes=self.max_value_bytes, prefix_bytes=self.prefix_bytes)

    def send(self, key: bytes | None, value: bytes | None, *, reason: str, detail: str,
             source_topic: str, partition: int | None, offset: int | None,
             consumer: str | None = None) -> bool:
        """Dead-letter one record; False (counted, logged) if the producer refused it."""
        return self.send_letter(self.letter(
            key, value, reason=reason, detail=detail, source_topic=source_topic,
            partition=partition, offset=offset, consumer=consumer))

    def send_letter(self, d: DeadLetter) -> bool:
        self.stats.by_reason[d.reason] = self.stats.by_reason.get(d.reason, 0) + 1
        DEAD_LETTERS.labels(self.client, d.reason).inc()
        error = self._produce(d)
        if error is not None and len(d.value) > self.prefix_bytes:
            # Too large after all (the broker's limit may be lower): send the reference.
            d = _reference(d.key, d.value, d.headers, d.reason, self.prefix_bytes)
            error = self._produce(d)
        if "loadcast.value_truncated" in dict(d.headers):
            self.stats.references += 1
            DEAD_LETTER_REFERENCES.labels(self.client).inc()
        if error is None:
            self.stats.sent += 1
            return True
        self.stats.failed += 1
        DEAD_LETTER_FAILURES.labels(self.client, error).inc()
        now = time.monotonic()
        if now - self._last_log >= 5.0:
            self._last_log = now
            log.error("%s: dead letter (%s) not produced: %s; %d failed so far", self.client,
                      d.reason, error, self.stats.failed)
        return False

    def _produce(self, d: DeadLetter) -> str | None:
        """None when queued, else the error's name."""
        try:
            ok = self.producer.produce(self.topic, value=d.value, key=d.key, headers=d.headers)
        except KafkaException as e:
            err = e.args[0] if e.args else None
            name = getattr(err, "name", None)
            return str(name()) if callable(name) else type(e).__name__
        except BufferError:
            return "BufferError"
        except (TypeError, ValueError) as e:
            return type(e).__name__
        if ok is False:
            return "buffer_full"
        return None
