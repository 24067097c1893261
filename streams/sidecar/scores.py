"""The score subscriber: LoadScore and Anomaly records from Kafka into the sidecar.

A confluent-kafka consumer in its own thread reads *every* partition of load-scores and
anomalies (no consumer group: each sidecar needs all scores), starting ``lookback_s``
back in time. Each poll returns a batch; the batch is decoded and handed to ``deliver``
in one call (the sidecar applies it on its event loop), so a burst of scores for one API
becomes one weight change. Records that do not decode, and LoadScores whose
``computed_at`` lies beyond the clock-skew allowance (``schemas.validation``: such a
score would win over every genuine one after it), are counted
(``loadcast_sidecar_scores_skipped_total{reason}``), sent to dead-letter with the reason
in the headers (:mod:`streams.kafka.deadletter`: a value too large goes as a reference), and
skipped.

If the thread dies all the same, :meth:`ScoreSubscriber.alive` says so (the sidecar's
``/health`` answers 503) and :meth:`ScoreSubscriber.supervise` starts a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
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
from streams.kafka.producer import RecordProducer
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings
from streams.sidecar import metrics as m

log = logging.getLogger(__name__)

Batch = list[tuple[str, dict[str, Any]]]  # (schema short name, record)
Deliver = Callable[[Batch], None]


class ScoreSubscriber:
    """Consume scores and anomalies in a thread; ``deliver(batch)`` per non-empty batch."""

    def __init__(
        self,
        settings: KafkaSettings,
        codec: Codec,
        deliver: Deliver,
        *,
        sidecar_id: str,
        dead_letter: RecordProducer | None = None,
        lookback_s: float = 300.0,
        max_batch: int = 1000,
        mirror_status_lookback_s: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.deliver = deliver
        self.sidecar_id = sidecar_id
        self.dead_letter = dead_letter
        self.runtime = KafkaRuntime(settings)
        self.dlq_topic = self.runtime.topic("dead-letter")
        self.limits = limits
        self.dead_letters = (self.runtime.dead_letter(dead_letter, client=f"sidecar-{sidecar_id}")
                             if dead_letter is not None else None)
        self.topics = [self.runtime.topic("load-scores"), self.runtime.topic("anomalies")]
        self.lookback_s = lookback_s
        self.lookbacks = dict.fromkeys(self.topics, lookback_s)
        if mirror_status_lookback_s is not None:  # the traffic director's mirrors
            status = self.runtime.topic("mirror-status")
            self.topics.append(status)
            self.lookbacks[status] = mirror_status_lookback_s
        self.max_batch = max_batch
        self.skipped = 0
        self.received = 0
        self.crashes = 0  # times the thread died and was restarted
        self.died_at: float | None = None  # monotonic time of the last death
        self.assigned = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Low fetch wait: a score should be live within milliseconds of being published.
        conf: dict[str, Any] = {
            "client.id": f"sidecar-{sidecar_id}",
            "fetch.wait.max.ms": 10,
            "fetch.min.bytes": 1,
            "enable.partition.eof": False,
        }
        self._consumer = self.runtime.consumer(None, **conf)

    def _assign(self) -> None:
        md = self._consumer.list_topics(timeout=10)
        now = time.time()
        parts = [
            TopicPartition(t, p, int((now - self.lookbacks[t]) * 1000))
            for t in self.topics
            if t in md.topics
            for p in md.topics[t].partitions
        ]
        missing = [t for t in self.topics if t not in md.topics]
        if missing:
            log.warning("topics missing, not consuming them: %s", ", ".join(missing))
        try:
            located = self._consumer.offsets_for_times(parts, timeout=10)
            # -1: no record that recent in this partition; start at its end then.
            for tp in located:
                if tp.offset < 0:
                    tp.offset = OFFSET_END
        except KafkaException as e:  # brokers without timestamp lookups: read everything
            log.warning("offsets_for_times failed (%s): reading scores from the start", e)
            located = [TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in parts]
        self._consumer.assign(located)
        self.assigned.set()

    def start(self) -> None:
        self._assign()
        self._spawn()

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._main, name="sidecar-scores", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """The reader thread runs (or was never started / was stopped on purpose)."""
        if self._thread is None or self._stop.is_set():
            return True
        return self._thread.is_alive()

    def supervise(self, restart_after_s: float = 1.0) -> bool:
        """Start a new reader thread if the last one died at least ``restart_after_s``
        ago (the sidecar calls this every second); True if it restarted one."""
        if self.alive() or self._stop.is_set():
            return False
        if self.died_at is not None and time.monotonic() - self.died_at < restart_after_s:
            return False
        log.warning("restarting the score reader (crashed %d times)", self.crashes)
        self._spawn()
        return True

    def _main(self) -> None:
        try:
            self._run()
        except BaseException:
            self.crashes += 1
            self.died_at = time.monotonic()
            log.exception("the score reader died; /health is 503 until it is restarted")

    def _decode(self, value: bytes | None, key: bytes | None, topic: str,
                msg: Any = None) -> Any:
        try:
            if value is None:
                raise CodecError("truncated", "empty value")
            name = self.codec.name_of(value).rsplit(".", 1)[-1]
            if name not in ("LoadScore", "Anomaly", "MirrorStatus"):
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
        m.SCORES_SKIPPED.labels(self.sidecar_id, reason).inc()
        log.warning("skipping record on %s: %s: %s", topic, reason, detail[:300])
        if self.dead_letters is not None:
            self.dead_letters.send(
                key, value, reason=reason, detail=detail, source_topic=topic,
                partition=msg.partition() if msg is not None else None,
                offset=msg.offset() if msg is not None else None,
                consumer=f"sidecar-{self.sidecar_id}")

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
                log.warning("score consumer error: %s", e)
                self._stop.wait(0.5)
                continue
            batch: Batch = []
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("score consumer error: %s", err)
                    continue
                decoded = self._decode(msg.value(), msg.key(), msg.topic() or "", msg)
                if decoded is not None:
                    batch.append(decoded)
            if batch:
                self.received += len(batch)
                m.SCORES_RECEIVED.labels(self.sidecar_id).inc(len(batch))
                try:
                    self.deliver(batch)
                except Exception:  # a bug downstream must not kill the subscriber
                    log.exception("applying %d score records failed", len(batch))
            if self.dead_letter is not None:
                self.dead_letter.poll(0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._consumer.close()
