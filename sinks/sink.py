"""The ClickHouse sink: every loadcast topic into its table, batched, exactly once in effect.

One loop (:meth:`Sink.run`, this module) consumes with confluent-kafka and hands each
record to the ClickHouse writer (:mod:`sinks.writer`), which decodes it, turns it into rows
(:mod:`sinks.convert`) and keeps them per table until the batch holds
``batch_max_records`` records or is ``batch_max_seconds`` old; then the writer inserts one
columnar block per table through clickhouse-connect and, only after every insert of the
batch succeeded, the loop commits the offsets. The offset bookkeeping (what ClickHouse
already holds, the lag) is :mod:`sinks.offsets`. Telemetry values of the current schemas are not
decoded here: they are kept raw and ClickHouse decodes them (:mod:`sinks.avro_ingest`,
about 6x faster); a batch it refuses is decoded here instead.

Why nothing is stored twice:

- A crash between insert and commit makes Kafka deliver the batch again. On each
  (re-)assignment the sink asks ClickHouse which offsets at or after the first one it
  re-reads are already stored and skips those records (``loadcast_sink_already_stored``),
  so the raw tables *and* the rollups fed by materialized views see each record once.
- Topic tables are ReplacingMergeTree keyed by the Kafka coordinates, and every insert
  carries a deduplication token, so a retried insert that had in fact succeeded (an
  ambiguous network error) is dropped by ClickHouse.

When ClickHouse is unreachable the sink keeps the batch, pauses its partitions, backs off
exponentially, commits nothing and retries; ``loadcast_sink_lag_records`` grows meanwhile.

Undecodable or unconvertible records are produced raw to the dead-letter topic with
headers ``loadcast.reason``, ``loadcast.detail``, ``loadcast.source_topic``,
``loadcast.partition`` and ``loadcast.offset``; the sink reads that topic like any other
into the ``dead_letter`` table (or inserts the row itself when it does not consume it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from schemas.codec import Codec
from schemas.validation import DEFAULT_LIMITS, Limits
from sinks import metrics
from sinks.db import ClickHouseUnavailable, connect
from sinks.offsets import PartitionLag, StoredOffsets
from sinks.settings import SinkSettings
from sinks.writer import Batch, ClickHouseWriter
from streams.kafka.runtime import KafkaRuntime

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from streams.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass
class SinkStats:
    """What the sink has done since it started."""

    records: int = 0  # consumed and committed
    rows: int = 0  # inserted
    dead_lettered: int = 0
    already_stored: int = 0
    batches: int = 0
    insert_failures: int = 0
    commits: int = 0
    expired: int = 0  # rows older than the TTL at insert (ClickHouse drops them at once)


class Sink:
    """Consume ``settings.topics`` into ClickHouse; see the module docstring.

    ``client_factory`` opens ClickHouse (default: :func:`sinks.db.connect` on ``settings``);
    ``after_insert`` is called after a batch's inserts and before its commit (tests use it
    to kill the process exactly there).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: SinkSettings,
        *,
        codec: Codec | None = None,
        client_factory: Callable[[], Client] | None = None,
        after_insert: Callable[[], None] | None = None,
        client_id: str = "loadcast-sink",
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.kafka = kafka
        self.settings = settings
        self.codec = codec or Codec.for_registry(kafka.schema_registry_url)
        self._after_insert = after_insert
        self.topics = {f"{kafka.topic_prefix}{short}": short for short in settings.topics}
        runtime = KafkaRuntime(kafka)
        self.offsets = StoredOffsets(self.topics)
        self.lag_state = PartitionLag(self.topics, settings.topics, runtime.admin)
        conf: dict[str, Any] = {
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "client.id": client_id,
            # librdkafka statistics carry the fetch responses' high watermarks.
            "statistics.interval.ms": 1000,
            "stats_cb": self.lag_state.on_stats,
        }
        self.consumer = runtime.consumer(settings.group_id, **conf)
        self.producer = runtime.producer(**{"client.id": f"{client_id}-dlq",
                                            "enable.idempotence": True, "linger.ms": 5})
        self.dead_letters = runtime.dead_letter(self.producer, client=client_id)
        self.writer = ClickHouseWriter(settings, self.codec, limits, self.topics,
                                       self.dead_letters,
                                       client_factory or (lambda: connect(settings)))
        self.ready = self.writer.ready  # set once ClickHouse is open and migrated
        self.stats = SinkStats()
        self._paused = False
        self._backoff = settings.backoff_initial_seconds
        self._retry_at = 0.0
        self._lag_at = 0.0
        self.last_error: str | None = None

    @property
    def pending(self) -> int:
        """Records consumed and not yet stored (the current batch)."""
        return self.writer.batch.messages

    # ------------------------------------------------------------------ Kafka callbacks

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.lag_state.on_assign(key)
            self.offsets.assigned(key)
        self._paused = False

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Eager rebalancing: everything goes back to the committed offsets, so the
        # uncommitted batch is dropped here and read again by whoever gets the partitions.
        if self.writer.batch.messages:
            log.info("partitions revoked: dropping %d uncommitted records",
                     self.writer.batch.messages)
        self.writer.batch = Batch()
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.lag_state.on_revoke(key)
            self.offsets.revoked(key)
        self._paused = False

    # ------------------------------------------------------------------ a batch

    def flush(self) -> bool:
        """Insert the batch, produce its dead letters, commit; False if ClickHouse failed
        (the batch is kept for the next attempt and nothing is committed)."""
        b = self.writer.batch
        if not b.messages:
            return True
        try:
            client = self.writer.ensure_client()
            self.offsets.check(client, b)
            self._skipped(self.offsets.filter(b))
            self.stats.expired += sum(self.writer.count_expired().values())
            rows = self.writer.write(client)
        except Exception as e:
            self._failed(e)
            return False
        metrics.SINK_UP.set(1)
        self.last_error = None
        if b.refused:
            log.warning("ClickHouse refused %d rows of this batch; they were dead-lettered "
                        "(reason insert_refused, `loadcast query dead-letter`)", b.refused)
        if self._after_insert is not None:
            self._after_insert()
        log.debug("inserted %d rows", rows)
        if b.dead and not self._send_dead_letters(b):
            return False
        self._commit(b)
        log.debug("stored %d records (%d rows) of %d partitions", b.messages, rows, len(b.last))
        self.stats.rows += rows
        self.stats.batches += 1
        self.writer.batch = Batch()
        self._backoff = self.settings.backoff_initial_seconds
        if self._paused:
            self.consumer.resume([TopicPartition(t, p) for t, p in self.lag_state.assigned])
            self._paused = False
        return True

    def _skipped(self, skipped: dict[str, int]) -> None:
        for topic, n in skipped.items():
            self.stats.already_stored += n
            metrics.SINK_SKIPPED.labels(self.topics.get(topic, topic)).inc(n)

    def _send_dead_letters(self, b: Batch) -> bool:
        for d in b.dead:
            self.dead_letters.send_letter(d)  # errors are counted there, never raised
        left = self.producer.flush(30)
        if left:
            self._failed(RuntimeError(f"{left} dead letters not acknowledged by Kafka"))
            return False
        self.stats.dead_lettered += len(b.dead)
        b.dead = []
        return True

    def _commit(self, b: Batch) -> None:
        offsets = [TopicPartition(t, p, last + 1) for (t, p), last in b.last.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            self.stats.commits += 1
        except KafkaException as e:
            # Stored but not committed: after the rebalance that caused this, the records
            # are re-read and skipped as already stored.
            log.warning("commit failed (records are stored; will be skipped): %s", e)
        for (t, p), last in b.last.items():
            self.lag_state.stored_up_to((t, p), last + 1)
            metrics.SINK_RECORDS.labels(self.topics[t]).inc(b.last[(t, p)] - b.first[(t, p)] + 1)
        self.stats.records += b.messages

    def _failed(self, e: Exception) -> None:
        self.stats.insert_failures += 1
        metrics.SINK_INSERT_FAILURES.inc()
        metrics.SINK_UP.set(0)
        self.last_error = f"{type(e).__name__}: {e}"
        if not isinstance(e, ClickHouseUnavailable):
            self.writer.drop_client()  # reconnect next time: the connection may be broken
        self._retry_at = time.monotonic() + self._backoff
        log.warning("ClickHouse insert failed (%s); %d records kept, retry in %.1fs",
                    self.last_error, self.writer.batch.messages, self._backoff)
        self._backoff = min(self._backoff * 2, self.settings.backoff_max_seconds)
        if not self._paused and self.lag_state.assigned:
            self.consumer.pause([TopicPartition(t, p) for t, p in self.lag_state.assigned])
            self._paused = True

    # ------------------------------------------------------------------ lag

    def lag(self, timeout: float = 10.0) -> dict[str, int]:
        """Records per topic not yet stored (:meth:`sinks.offsets.PartitionLag.lag`)."""
        return self.lag_state.lag(timeout)

    def last_lag(self) -> dict[str, int]:
        """The lag as last computed (cheap; for health endpoints)."""
        return self.lag_state.last()

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event, *, lag_every: float = 2.0,
            until_idle: float | None = None) -> SinkStats:
        """Consume until ``stop`` is set (or, with ``until_idle``, until nothing was
        consumed and nothing was pending for that many seconds after partitions were
        assigned); then flush and close."""
        self.consumer.subscribe(
            list(self.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        idle_since = time.monotonic()
        self.lag_state.start(lag_every)
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= self._lag_at:
                    self._lag_at = now + 1.0
                    self.lag_state.fill_committed(self.consumer)
                if self._paused or (self.pending and self._retry_at > now):
                    self._back_off()
                    idle_since = time.monotonic()
                    continue
                consumed = self._step()
                if consumed or self.pending or not self.lag_state.assigned:
                    # Idle counts from the assignment on: joining the group takes seconds.
                    idle_since = time.monotonic()
                elif until_idle is not None and time.monotonic() - idle_since >= until_idle:
                    break
        finally:
            self.close()
        return self.stats

    def _back_off(self) -> None:
        """Backing off: keep the group membership alive, take nothing new."""
        for m in self.consumer.consume(100, 0.1):
            self._accept(m)
        if time.monotonic() >= self._retry_at:
            self.flush()

    def _step(self) -> int:
        """Consume what is there (up to the batch's room); flush a full or old batch."""
        s = self.settings
        want = s.batch_max_records - self.pending
        msgs = self.consumer.consume(min(max(want, 1), 10_000), 0.1)
        for m in msgs:
            self._accept(m)
        b = self.writer.batch
        if b.messages and (
            b.messages >= s.batch_max_records
            or time.monotonic() - b.started >= s.batch_max_seconds
        ):
            self.flush()
        return len(msgs)

    def _accept(self, m: Message) -> None:
        err = m.error()
        if err is not None:
            log.warning("consumer error: %s", err)
            return
        self.lag_state.seen[(str(m.topic()), int(m.partition() or 0))] = int(m.offset() or 0) + 1
        self.writer.add(m)

    def close(self) -> None:
        """Flush what can be flushed, leave the group, close ClickHouse."""
        self.lag_state.stop()
        if self.pending and not self._paused:
            self.flush()
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as e:
            log.debug("consumer close: %s", e)
        self.producer.flush(5)
        self.writer.drop_client()


def describe(stats: SinkStats) -> dict[str, Any]:
    """Stats as a plain dict (for logs and the admin endpoint)."""
    return dict(stats.__dict__)
