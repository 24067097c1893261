"""A record feed: every partition of a few topics, read from a point in time, decoded,
validated and handed over in batches, in a thread of its own (no consumer group: each
reader needs every record). The sidecar reads its scores this way; the API its scores,
anomalies, mirror statuses and global models.

Records that do not decode, whose schema is not one the topic carries, and LoadScores
whose ``computed_at`` lies beyond the clock-skew allowance (``schemas.validation``: such a
score would win over every genuine one after it), are counted, sent to dead-letter with
the reason in the headers (:mod:`streams.kafka.deadletter`: a value too large goes as a
reference), and skipped.

If the thread dies all the same, :meth:`RecordFeed.alive` says so (its owner's ``/health``
answers 503) and :meth:`RecordFeed.supervise` starts a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from schemas.codec import Codec, CodecError
from schemas.validation import DEFAULT_LIMITS, Limits, reference_ms, score_problem
from streams.kafka.deadletter import LogThrottle
from streams.kafka.producer import RecordProducer
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)
FETCH_WAIT_MS = 100  # longest wait of an idle fetch (see RecordFeed)

Batch = list[tuple[str, dict[str, Any]]]  # (schema short name, record)
Deliver = Callable[[Batch], None]


@dataclass(frozen=True)
class FeedTopic:
    """What one topic of a feed carries (schema short names), and how far back to start
    reading it (``lookback_s=None``: from the beginning, e.g. a compacted topic)."""

    schemas: frozenset[str]
    lookback_s: float | None


def _noop(*_: Any) -> None:
    return None


class RecordFeed:
    """Read ``topics`` (short names) in a thread; ``deliver(batch)`` per non-empty batch.

    ``on_received(n)`` and ``on_skipped(reason)`` let the owner count in its own metrics.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        codec: Codec,
        deliver: Deliver,
        *,
        client_id: str,
        topics: Mapping[str, FeedTopic],
        dead_letter: RecordProducer | None = None,
        max_batch: int = 1000,
        limits: Limits = DEFAULT_LIMITS,
        on_received: Callable[[int], None] = _noop,
        on_skipped: Callable[[str], None] = _noop,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.deliver = deliver
        self.client_id = client_id
        self.dead_letter = dead_letter
        self.runtime = KafkaRuntime(settings)
        self.dlq_topic = self.runtime.topic("dead-letter")
        self.limits = limits
        self.on_received = on_received
        self.on_skipped = on_skipped
        self.dead_letters = (self.runtime.dead_letter(dead_letter, client=client_id)
                             if dead_letter is not None else None)
        self.kinds = {self.runtime.topic(short): kind for short, kind in topics.items()}
        self.topics = list(self.kinds)
        self.max_batch = max_batch
        self._log = LogThrottle()
        self.skipped = 0
        self.received = 0
        self.crashes = 0  # times the thread died and was restarted
        self.died_at: float | None = None  # monotonic time of the last death
        self.assigned = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Fetch wait: a score is live at most 100 ms after it is published (scores come
        # every step, a second or more). Shorter costs the broker: a broker that holds an
        # idle fetch for the whole wait (Tansu does) answers 10 idle readers' 1,000 fetches/s
        # at 32 % of a CPU at 10 ms, 9 % at 100 ms (measured; the demo runs 9 of them).
        conf: dict[str, Any] = {
            "client.id": client_id,
            "fetch.wait.max.ms": FETCH_WAIT_MS,
            "fetch.min.bytes": 1,
            "enable.partition.eof": False,
        }
        self._consumer = self.runtime.consumer(None, **conf)

    def _assign(self) -> None:
        md = self._consumer.list_topics(timeout=10)
        missing = [t for t in self.topics if t not in md.topics]
        if missing:
            log.warning("topics missing, not consuming them: %s", ", ".join(missing))
        now = time.time()
        start: list[TopicPartition] = []
        timed: list[TopicPartition] = []
        ends: dict[tuple[str, int], int] = {}
        for t in self.topics:
            if t not in md.topics:
                continue
            lookback = self.kinds[t].lookback_s
            for p in md.topics[t].partitions:
                if lookback is None:
                    start.append(TopicPartition(t, p, OFFSET_BEGINNING))
                    continue
                # The end as of now, asked before the time lookup: a record produced
                # after this is read. (The logical OFFSET_END would be resolved later,
                # in the background, and could skip a record produced meanwhile.)
                ends[(t, p)] = self._end_of(t, p)
                timed.append(TopicPartition(t, p, int((now - lookback) * 1000)))
        try:
            located = self._consumer.offsets_for_times(timed, timeout=10) if timed else []
            for tp in located:
                if tp.offset < 0:  # no record that recent: start at the end
                    tp.offset = ends[(tp.topic, tp.partition)]
        except KafkaException as e:  # brokers without timestamp lookups: read everything
            log.warning("offsets_for_times failed (%s): reading %s from the start", e,
                        self.client_id)
            located = [TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in timed]
        self._consumer.assign(start + located)
        self.assigned.set()

    def _end_of(self, topic: str, partition: int) -> int:
        try:
            _, high = self._consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10, cached=False)
        except KafkaException as e:
            log.warning("end of %s[%d] unknown (%s): reading from the end", topic, partition, e)
            return OFFSET_END
        return int(high)

    def start(self) -> None:
        self._assign()
        self._spawn()

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"{self.client_id}-feed",
                                        daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """The reader thread runs (or was never started / was stopped on purpose)."""
        if self._thread is None or self._stop.is_set():
            return True
        return self._thread.is_alive()

    def supervise(self, restart_after_s: float = 1.0) -> bool:
        """Start a new reader thread if the last one died at least ``restart_after_s``
        ago (its owner calls this every second); True if it restarted one."""
        if self.alive() or self._stop.is_set():
            return False
        if self.died_at is not None and time.monotonic() - self.died_at < restart_after_s:
            return False
        log.warning("restarting the %s feed (crashed %d times)", self.client_id, self.crashes)
        self._spawn()
        return True

    def _main(self) -> None:
        try:
            self._run()
        except BaseException:
            self.crashes += 1
            self.died_at = time.monotonic()
            log.exception("the %s feed died; /health is 503 until it is restarted", self.client_id)

    def _decode(self, value: bytes | None, key: bytes | None, topic: str,
                msg: Any = None) -> Any:
        try:
            if value is None:
                raise CodecError("truncated", "empty value")
            name = self.codec.name_of(value).rsplit(".", 1)[-1]
            if name not in self.kinds[topic].schemas:
                raise CodecError("wrong_schema", f"{name} on {topic}")
            record = self.codec.decode(value)
        except CodecError as e:
            self._skip(key, value, topic, msg, e.reason, str(e))
            return None
        if name == "LoadScore":
            ts = msg.timestamp() if msg is not None else (0, 0)
            problem = score_problem(
                record, reference_ms(ts[1] if ts[0] != 0 else None), self.limits)
            if problem is not None:
                self._skip(key, value, topic, msg, problem[0], problem[1])
                return None
        return name, record

    def _skip(self, key: bytes | None, value: bytes | None, topic: str, msg: Any,
              reason: str, detail: str) -> None:
        self.skipped += 1
        self.on_skipped(reason)
        n = self._log.due()
        if n:
            log.warning("skipping record on %s: %s: %s (%d skipped since the last line)",
                        topic, reason, detail[:300], n)
        if self.dead_letters is not None:
            self.dead_letters.send(
                key, value, reason=reason, detail=detail, source_topic=topic,
                partition=msg.partition() if msg is not None else None,
                offset=msg.offset() if msg is not None else None,
                consumer=self.client_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # consume(n, timeout) waits the whole timeout unless n arrive: wait for the
                # first record with poll(), then take whatever else is already there.
                first = self._consumer.poll(0.1)
                if first is None:
                    continue
                msgs = [first, *self._consumer.consume(self.max_batch, 0)]
            except KafkaException as e:
                log.warning("%s feed consumer error: %s", self.client_id, e)
                self._stop.wait(0.5)
                continue
            batch: Batch = []
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("%s feed consumer error: %s", self.client_id, err)
                    continue
                decoded = self._decode(msg.value(), msg.key(), msg.topic() or "", msg)
                if decoded is not None:
                    batch.append(decoded)
            if batch:
                self.received += len(batch)
                self.on_received(len(batch))
                try:
                    self.deliver(batch)
                except Exception:  # a bug downstream must not kill the subscriber
                    log.exception("applying %d records failed", len(batch))
            if self.dead_letter is not None:
                self.dead_letter.poll(0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._consumer.close()
