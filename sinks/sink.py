"""The ClickHouse sink: every loadcast topic into its table, batched, exactly once in effect.

One loop (:meth:`Sink.run`) consumes with confluent-kafka, decodes with the codec, turns
values into rows (:mod:`sinks.convert`) and keeps them per table until the batch holds
``batch_max_records`` records or is ``batch_max_seconds`` old; then it inserts one
columnar block per table through clickhouse-connect and, only after every insert of the
batch succeeded, commits the offsets. Telemetry values of the current schemas are not
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

import json
import logging
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from schemas.codec import Codec, CodecError, Record
from schemas.validation import (
    DEFAULT_LIMITS,
    Limits,
    reference_ms,
    score_problem,
    telemetry_problem,
)
from sinks import metrics
from sinks.avro_ingest import FastPath, IngestTable
from sinks.convert import (
    TOPIC_SCHEMAS,
    ConversionError,
    Row,
    dead_letter_row,
    header_map,
    rows_for,
)
from sinks.db import ClickHouseUnavailable, close_quietly, connect
from sinks.ddl import TABLE_BY_NAME, TABLE_BY_TOPIC, migrate
from sinks.settings import SinkSettings
from streams.kafka.deadletter import DeadLetter, DeadLetterWriter

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from streams.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)

TP = tuple[str, int]  # (full topic name, partition)


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


@dataclass
class _Batch:
    rows: dict[str, list[Row]] = field(default_factory=dict)
    first: dict[TP, int] = field(default_factory=dict)
    last: dict[TP, int] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    messages: int = 0
    started: float = 0.0
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    inserted: set[str] = field(default_factory=set)
    filtered: bool = False
    expired_checked: bool = False
    refused: int = 0  # rows ClickHouse refused (dead-lettered one by one)
    # Telemetry values ClickHouse decodes itself (sinks.avro_ingest), per ingest table.
    raw: dict[str, list[Message]] = field(default_factory=dict)

    def note(self, key: TP, offset: int) -> None:
        if not self.messages:
            self.started = time.monotonic()
        self.messages += 1
        self.first.setdefault(key, offset)
        self.last[key] = offset


class _DataError(Exception):
    """An insert ClickHouse (or the client) refused because of the rows themselves."""


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
        self.limits = limits
        self._client_factory = client_factory or (lambda: connect(settings))
        self._after_insert = after_insert
        self.topics = {f"{kafka.topic_prefix}{short}": short for short in settings.topics}
        self.dead_letter_topic = f"{kafka.topic_prefix}dead-letter"
        self._sinks_dead_letter = "dead-letter" in settings.topics
        self.fast = FastPath(self.codec, limits) if settings.decode_in_clickhouse else None
        self._fast_tables: dict[str, IngestTable] = (
            {t.table: t for t in self.fast.tables} if self.fast else {}
        )
        conf = kafka.consumer_config(
            settings.group_id,
            **{
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "client.id": client_id,
                # librdkafka statistics carry the fetch responses' high watermarks.
                "statistics.interval.ms": 1000,
                "stats_cb": self._on_stats,
            },
        )
        self.consumer = Consumer(conf)
        pconf = kafka.client_config()
        pconf.update({"client.id": f"{client_id}-dlq", "enable.idempotence": True, "linger.ms": 5})
        self.producer = Producer(pconf)
        self.dead_letters = DeadLetterWriter(self.producer, self.dead_letter_topic,
                                             client=client_id)
        self.client: Client | None = None
        self.stats = SinkStats()
        self._batch = _Batch()
        self._stored: dict[TP, tuple[set[int], int]] = {}  # offsets already in ClickHouse
        self._unchecked: set[TP] = set()  # assigned, not yet compared with ClickHouse
        self._next: dict[TP, int] = {}  # next offset to store, per partition
        self._seen: dict[TP, int] = {}  # next offset after the last one consumed
        self._fetched_hwm: dict[TP, int] = {}  # high watermarks of fetch responses
        self._assigned: set[TP] = set()
        self._paused = False
        self._backoff = settings.backoff_initial_seconds
        self._retry_at = 0.0
        self._lag_at = 0.0
        self._admin: AdminClient | None = None
        self._lag_stop = threading.Event()
        self._lag_thread: threading.Thread | None = None
        self._lag: dict[str, int] = {}
        self._lock = threading.Lock()  # guards _lag, _next, _assigned (lag thread)
        self.last_error: str | None = None
        self.ready = threading.Event()  # set once ClickHouse is open and migrated

    # ------------------------------------------------------------------ Kafka callbacks

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                key = (tp.topic, tp.partition)
                self._assigned.add(key)
                self._unchecked.add(key)
                self._next.pop(key, None)
        self._paused = False

    def _on_stats(self, stats_json: str) -> None:
        try:
            topics = json.loads(stats_json).get("topics", {})
        except ValueError:
            return
        for topic, t in topics.items():
            for p, part in t.get("partitions", {}).items():
                hi = part.get("hi_offset", -1)
                if p != "-1" and isinstance(hi, int) and hi >= 0:
                    self._fetched_hwm[(topic, int(p))] = hi

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Eager rebalancing: everything goes back to the committed offsets, so the
        # uncommitted batch is dropped here and read again by whoever gets the partitions.
        if self._batch.messages:
            log.info("partitions revoked: dropping %d uncommitted records", self._batch.messages)
        self._batch = _Batch()
        with self._lock:
            for tp in partitions:
                key = (tp.topic, tp.partition)
                self._assigned.discard(key)
                self._unchecked.discard(key)
                self._stored.pop(key, None)
                self._next.pop(key, None)
        self._paused = False

    # ------------------------------------------------------------------ records

    def _add(self, msg: Message) -> None:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        assert topic is not None and partition is not None and offset is not None
        key = (topic, partition)
        b = self._batch
        b.note(key, offset)
        self._seen[key] = offset + 1
        short = self.topics[topic]
        value = msg.value()
        if short == "dead-letter":
            ts = msg.timestamp()[1]
            row = dead_letter_row(
                topic, partition, offset, ts if ts > 0 else _now_ms(), msg.key(), value,
                msg.headers(),
            )
            b.rows.setdefault("dead_letter", []).append((topic, partition, offset, 0, *row))
            return
        if value is None:
            if short == "global-model":  # a tombstone (compacted): nothing to store
                return
            self._dead_letter(msg, "invalid", "record has no value")
            return
        if self.fast is not None and short == "telemetry":
            ingest = self.fast.table_for(value)
            if ingest is not None:
                b.raw.setdefault(ingest.table, []).append(msg)
                return
        self._decode(msg, short, value)

    def _decode(self, msg: Message, short: str, value: bytes) -> None:
        """Decode and convert one value in Python into the batch's rows (or dead letters)."""
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        assert topic is not None and partition is not None and offset is not None
        b = self._batch
        try:
            name = self.codec.name_of(value)
            if name not in TOPIC_SCHEMAS[short]:
                expected = " or ".join(TOPIC_SCHEMAS[short])
                raise CodecError("wrong_schema", f"{name} on {short}, expected {expected}")
            record = self.codec.decode(value)
            problem = self._problem(msg, short, record)
            if problem is not None:
                self._dead_letter(msg, problem[0], f"{problem[0]}: {problem[1]}")
                return
            rows = rows_for(short, record)
        except CodecError as e:
            self._dead_letter(msg, e.reason, str(e))
            return
        except ConversionError as e:
            self._dead_letter(msg, "unconvertible", str(e))
            return
        table = b.rows.setdefault(TABLE_BY_TOPIC[short].name, [])
        for i, r in enumerate(rows):
            table.append((topic, partition, offset, i, *r))

    def _problem(self, msg: Message, short: str, record: Record) -> tuple[str, str] | None:
        """schemas.validation's verdict (the worker's too) on a decoded value."""
        if short == "telemetry":
            ref = reference_ms(_timestamp(msg))
            windows = record.get("windows", [record])
            for i, w in enumerate(windows):
                problem = telemetry_problem(w, ref, self.limits)
                if problem is not None:
                    where = f"window {i}: " if "windows" in record else ""
                    return problem[0], where + problem[1]
        elif short == "load-scores":
            return score_problem(record, reference_ms(_timestamp(msg)), self.limits)
        return None

    def _dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        d = self.dead_letters.letter(msg.key(), msg.value(), reason=reason, detail=detail,
                                     source_topic=str(topic), partition=partition,
                                     offset=offset)
        self._batch.dead.append(d)
        if not self._sinks_dead_letter:
            row = dead_letter_row(
                self.dead_letter_topic, -1, -1, _now_ms(), d.key, d.value,
                list(d.headers),
            )
            self._batch.rows.setdefault("dead_letter", []).append(
                (str(topic), partition, offset, 0, *row)
            )
        metrics.SINK_DEAD.labels(reason).inc()
        log.warning("dead-lettered %s[%s]@%s: %s", topic, partition, offset, detail)

    # ------------------------------------------------------------------ ClickHouse

    def _ensure_client(self) -> Client:
        if self.client is None:
            client = self._client_factory()
            try:
                migrate(client, self.settings.ttl_days)
                for sql in self.fast.ddl() if self.fast else ():
                    client.command(sql)
            except Exception:
                close_quietly(client)
                raise
            self.client = client
            self.ready.set()
        return self.client

    def _drop_client(self) -> None:
        close_quietly(self.client)
        self.client = None

    def _check_stored(self, client: Client) -> None:
        """Find records of newly assigned partitions that ClickHouse already holds."""
        b = self._batch
        for key in [k for k in b.first if k in self._unchecked]:
            topic, partition = key
            short = self.topics[topic]
            table = TABLE_BY_TOPIC[short].name
            params = {"t": topic, "p": partition, "o": b.first[key]}
            found = {
                int(r[0])
                for r in client.query(
                    f"SELECT DISTINCT _offset FROM {table} WHERE _topic = {{t:String}} "
                    "AND _partition = {p:UInt32} AND _offset >= {o:UInt64}",
                    parameters=params,
                ).result_rows
            }
            if short != "dead-letter":
                found |= {
                    int(r[0])
                    for r in client.query(
                        "SELECT DISTINCT source_offset FROM dead_letter WHERE "
                        "source_topic = {t:String} AND source_partition = {p:Int32} "
                        "AND source_offset >= {o:Int64}",
                        parameters=params,
                    ).result_rows
                }
            if found:
                self._stored[key] = (found, max(found))
                log.info("%s[%d]: %d records at or after %d already stored",
                         topic, partition, len(found), b.first[key])
            self._unchecked.discard(key)

    def _filter_stored(self) -> None:
        b = self._batch
        if not self._stored or b.filtered:
            return
        skipped: dict[str, int] = {}
        for table, rows in b.rows.items():
            kept = []
            for r in rows:
                s = self._stored.get((r[0], r[1]))
                if s is not None and r[2] in s[0]:
                    if r[3] == 0:
                        skipped[r[0]] = skipped.get(r[0], 0) + 1
                    continue
                kept.append(r)
            b.rows[table] = kept
        for table, msgs in b.raw.items():
            kept_msgs = []
            for m in msgs:
                s = self._stored.get((str(m.topic()), int(m.partition() or 0)))
                if s is not None and m.offset() in s[0]:
                    skipped[str(m.topic())] = skipped.get(str(m.topic()), 0) + 1
                    continue
                kept_msgs.append(m)
            b.raw[table] = kept_msgs
        # A dead letter already in dead_letter was produced before the crash.
        b.dead = [
            d for d in b.dead
            if not _dead_stored(self._stored, d.headers)
        ]
        for topic, n in skipped.items():
            self.stats.already_stored += n
            metrics.SINK_SKIPPED.labels(self.topics.get(topic, topic)).inc(n)
        for key, last in b.last.items():  # past the stored range: stop checking
            s = self._stored.get(key)
            if s is not None and last >= s[1]:
                del self._stored[key]
        b.filtered = True

    def _count_expired(self) -> None:
        """Count (metric, stats) and warn once per batch about rows the table's TTL drops
        on insert: older than ``sink.ttl_days`` (a replay that kept its trace's dates)."""
        b = self._batch
        days = self.settings.ttl_days
        if b.expired_checked or days <= 0:
            return
        b.expired_checked = True
        cutoff = _now_ms() - days * 86_400_000
        found: dict[str, tuple[int, int]] = {}  # table: (rows, newest event time ms)
        for table, rows in b.rows.items():
            spec = TABLE_BY_NAME[table]
            if table == "dead_letter" or spec.time_column not in spec.insert_columns:
                continue
            i = spec.insert_columns.index(spec.time_column)
            old = [r[i] for r in rows if isinstance(r[i], int) and r[i] < cutoff]
            if old:
                found[table] = (len(old), max(old))
        if self.fast is not None:
            for table, msgs in b.raw.items():
                n, newest = self.fast.expired(self._fast_tables[table],
                                              [m.value() or b"" for m in msgs], cutoff)
                if n:
                    rows_before, newest_before = found.get("telemetry", (0, newest))
                    found["telemetry"] = (rows_before + n, max(newest, newest_before))
        if not found:
            return
        for table, (n, _) in found.items():
            metrics.SINK_EXPIRED.labels(table).inc(n)
            self.stats.expired += n
        detail = ", ".join(
            f"{table} {n} (newest {_iso(newest)})" for table, (n, newest) in found.items()
        )
        log.warning(
            "%d rows of this batch are older than the %d-day TTL (sink.ttl_days) and are "
            "dropped by ClickHouse at insert: %s. Replay traces re-timed (the default of "
            "`loadcast agent --replay`) or raise sink.ttl_days.",
            sum(n for n, _ in found.values()), days, detail,
        )

    def _insert(self, client: Client, table: str, rows: list[Row], token: str) -> int:
        """Insert rows (columnar); rows ClickHouse refuses are dead-lettered alone."""
        spec = TABLE_BY_NAME[table]
        started = time.perf_counter()
        try:
            client.insert(
                table, list(zip(*rows, strict=True)), column_names=spec.insert_columns,
                column_oriented=True,
                settings={
                    "insert_deduplication_token": token,
                    "deduplicate_blocks_in_dependent_materialized_views": 1,
                },
            )
        except (TypeError, ValueError, struct.error, OverflowError) as e:
            return self._bisect(client, table, rows, token, e)
        except Exception as e:
            from clickhouse_connect.driver.exceptions import DataError, ProgrammingError

            if isinstance(e, DataError | ProgrammingError):
                return self._bisect(client, table, rows, token, e)
            raise
        metrics.SINK_INSERT_SECONDS.labels(table).observe(time.perf_counter() - started)
        metrics.SINK_ROWS.labels(table).inc(len(rows))
        return len(rows)

    def _insert_raw(self, client: Client, ingest: IngestTable, msgs: list[Message],
                    token: str) -> int:
        """Let ClickHouse decode telemetry values; if it refuses any (garbage, out of
        range), decode these in Python instead, which dead-letters exactly the bad ones."""
        from clickhouse_connect.driver.exceptions import OperationalError

        assert self.fast is not None
        started = time.perf_counter()
        values = [m.value() or b"" for m in msgs]
        data = self.fast.container(ingest, (
            (str(m.topic()), int(m.partition() or 0), int(m.offset() or 0), v)
            for m, v in zip(msgs, values, strict=True)
        ), refs=[reference_ms(_timestamp(m)) for m in msgs])
        try:
            client.raw_insert(
                ingest.table, None, data, fmt="Avro",
                settings={
                    "insert_deduplication_token": token,
                    "deduplicate_blocks_in_dependent_materialized_views": 1,
                },
            )
        except (OperationalError, ClickHouseUnavailable):
            raise  # ClickHouse is away: keep the batch and retry it as it is
        except Exception as e:
            log.info("ClickHouse refused %d telemetry values (%s); decoding them here",
                     len(msgs), str(e).splitlines()[0][:300])
            metrics.SINK_SLOW_BATCHES.inc()
            for m, v in zip(msgs, values, strict=True):
                self._decode(m, "telemetry", v)
            return 0
        rows = self.fast.rows(ingest, values)
        metrics.SINK_INSERT_SECONDS.labels("telemetry").observe(time.perf_counter() - started)
        metrics.SINK_ROWS.labels("telemetry").inc(rows)
        return rows

    def _bisect(self, client: Client, table: str, rows: list[Row], token: str,
                error: Exception) -> int:
        if len(rows) == 1:
            topic, partition, offset = rows[0][:3]
            log.debug("%s refused a row of %s[%s]@%s: %s", table, topic, partition, offset, error)
            self._batch.refused += 1
            self._batch.dead.append(self.dead_letters.letter(
                None, None, reason="insert_refused", detail=str(error),
                source_topic=str(topic), partition=partition, offset=offset))
            metrics.SINK_DEAD.labels("insert_refused").inc()
            return 0
        mid = len(rows) // 2
        return (self._insert(client, table, rows[:mid], f"{token}a")
                + self._insert(client, table, rows[mid:], f"{token}b"))

    def flush(self) -> bool:
        """Insert the batch, produce its dead letters, commit; False if ClickHouse failed
        (the batch is kept for the next attempt and nothing is committed)."""
        b = self._batch
        if not b.messages:
            return True
        try:
            client = self._ensure_client()
            self._check_stored(client)
            self._filter_stored()
            self._count_expired()
            rows = 0
            for table, msgs in b.raw.items():
                if table in b.inserted or not msgs:
                    continue
                rows += self._insert_raw(client, self._fast_tables[table], msgs,
                                         f"{b.token}-{table}")
                b.inserted.add(table)
            for table, table_rows in b.rows.items():
                if table in b.inserted or not table_rows:
                    continue
                rows += self._insert(client, table, table_rows, f"{b.token}-{table}")
                b.inserted.add(table)
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
        if b.dead:
            for d in b.dead:
                self.dead_letters.send_letter(d)  # errors are counted there, never raised
            left = self.producer.flush(30)
            if left:
                self._failed(RuntimeError(f"{left} dead letters not acknowledged by Kafka"))
                return False
            self.stats.dead_lettered += len(b.dead)
            b.dead = []
        offsets = [TopicPartition(t, p, last + 1) for (t, p), last in b.last.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            self.stats.commits += 1
        except KafkaException as e:
            # Stored but not committed: after the rebalance that caused this, the records
            # are re-read and skipped as already stored.
            log.warning("commit failed (records are stored; will be skipped): %s", e)
        for (t, p), last in b.last.items():
            with self._lock:
                self._next[(t, p)] = last + 1
            metrics.SINK_RECORDS.labels(self.topics[t]).inc(b.last[(t, p)] - b.first[(t, p)] + 1)
        self.stats.records += b.messages
        log.debug("stored %d records (%d rows) of %d partitions", b.messages, rows, len(b.last))
        self.stats.rows += rows
        self.stats.batches += 1
        self._batch = _Batch()
        self._backoff = self.settings.backoff_initial_seconds
        if self._paused:
            self.consumer.resume([TopicPartition(t, p) for t, p in self._assigned])
            self._paused = False
        return True

    def _failed(self, e: Exception) -> None:
        self.stats.insert_failures += 1
        metrics.SINK_INSERT_FAILURES.inc()
        metrics.SINK_UP.set(0)
        self.last_error = f"{type(e).__name__}: {e}"
        if not isinstance(e, ClickHouseUnavailable):
            self._drop_client()  # reconnect next time: the connection may be broken
        self._retry_at = time.monotonic() + self._backoff
        log.warning("ClickHouse insert failed (%s); %d records kept, retry in %.1fs",
                    self.last_error, self._batch.messages, self._backoff)
        self._backoff = min(self._backoff * 2, self.settings.backoff_max_seconds)
        if not self._paused and self._assigned:
            self.consumer.pause([TopicPartition(t, p) for t, p in self._assigned])
            self._paused = True

    # ------------------------------------------------------------------ lag

    def lag(self, timeout: float = 10.0) -> dict[str, int]:
        """Records per topic not yet stored: high watermark - next offset to store (the
        committed offset, or the earliest when nothing was committed). One ListOffsets
        request for all partitions, so it is safe to call from another thread."""
        with self._lock:
            assigned = list(self._assigned)
            nexts = {k: self._next.get(k) for k in assigned}
        latest = self._list_offsets(assigned, OffsetSpec.latest(), timeout)
        # Tansu answers ListOffsets(latest) with the last batch's base offset + 1, so also
        # take the high watermark of fetch responses and the last offset seen.
        seen = dict(self._seen)  # one C-level copy: safe against the consumer thread
        fetched = dict(self._fetched_hwm)
        for key in assigned:
            latest[key] = max(latest.get(key, -1), fetched.get(key, -1), seen.get(key, -1))
        earliest = self._list_offsets(
            [k for k, n in nexts.items() if n is None], OffsetSpec.earliest(), timeout
        )
        out: dict[str, int] = {}
        for key, high in latest.items():
            nxt = nexts.get(key)
            if nxt is None:
                nxt = earliest.get(key, 0)
            short = self.topics[key[0]]
            out[short] = out.get(short, 0) + max(0, high - nxt)
        for short in self.settings.topics:
            metrics.SINK_LAG.labels(short).set(out.get(short, 0))
        with self._lock:
            self._lag = out
        return out

    def _list_offsets(self, keys: list[TP], spec: OffsetSpec, timeout: float) -> dict[TP, int]:
        if not keys:
            return {}
        if self._admin is None:
            self._admin = AdminClient(self.kafka.client_config())
        futures = self._admin.list_offsets(
            {TopicPartition(t, p): spec for t, p in keys}, request_timeout=timeout
        )
        out: dict[TP, int] = {}
        for tp, fut in futures.items():
            try:
                out[(tp.topic, tp.partition)] = fut.result().offset
            except KafkaException as e:
                log.debug("offsets of %s[%d] unknown: %s", tp.topic, tp.partition, e)
        return out

    def last_lag(self) -> dict[str, int]:
        """The lag as last computed (cheap; for health endpoints)."""
        with self._lock:
            return dict(self._lag)

    def _lag_loop(self, every: float) -> None:
        while not self._lag_stop.wait(every):
            try:
                self.lag()
            except Exception as e:  # never let the metric thread die silently
                log.warning("lag not computed: %s", e)

    def _fill_committed(self) -> None:
        """Next offsets of partitions assigned since the last call (committed offsets)."""
        with self._lock:
            missing = [k for k in self._assigned if self._next.get(k) is None]
        if not missing:
            return
        try:
            tps = self.consumer.committed([TopicPartition(t, p) for t, p in missing], timeout=5)
        except KafkaException as e:
            log.debug("committed offsets unknown: %s", e)
            return
        with self._lock:
            for tp in tps:
                key = (tp.topic, tp.partition)
                if tp.offset >= 0 and key in self._assigned and key not in self._next:
                    self._next[key] = tp.offset

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event, *, lag_every: float = 2.0,
            until_idle: float | None = None) -> SinkStats:
        """Consume until ``stop`` is set (or, with ``until_idle``, until nothing was
        consumed and nothing was pending for that many seconds after partitions were
        assigned); then flush and close."""
        self.consumer.subscribe(
            list(self.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        s = self.settings
        idle_since = time.monotonic()
        self._lag_thread = threading.Thread(
            target=self._lag_loop, args=(lag_every,), name="sink-lag", daemon=True
        )
        self._lag_thread.start()
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= self._lag_at:
                    self._lag_at = now + 1.0
                    self._fill_committed()
                if self._paused or (self._batch.messages and self._retry_at > now):
                    # Backing off: keep the group membership alive, take nothing new.
                    for m in self.consumer.consume(100, 0.1):
                        self._accept(m)
                    if time.monotonic() >= self._retry_at:
                        self.flush()
                    idle_since = time.monotonic()
                    continue
                want = s.batch_max_records - self._batch.messages
                msgs = self.consumer.consume(min(max(want, 1), 10_000), 0.1)
                for m in msgs:
                    self._accept(m)
                b = self._batch
                if b.messages and (
                    b.messages >= s.batch_max_records
                    or time.monotonic() - b.started >= s.batch_max_seconds
                ):
                    self.flush()
                if msgs or self._batch.messages or not self._assigned:
                    # Idle counts from the assignment on: joining the group takes seconds.
                    idle_since = time.monotonic()
                elif until_idle is not None and time.monotonic() - idle_since >= until_idle:
                    break
        finally:
            self.close()
        return self.stats

    def _accept(self, m: Message) -> None:
        err = m.error()
        if err is not None:
            log.warning("consumer error: %s", err)
            return
        self._add(m)

    def close(self) -> None:
        """Flush what can be flushed, leave the group, close ClickHouse."""
        self._lag_stop.set()
        if self._lag_thread is not None:
            self._lag_thread.join(15)
        if self._batch.messages and not self._paused:
            self.flush()
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as e:
            log.debug("consumer close: %s", e)
        self.producer.flush(5)
        self._drop_client()


def _dead_stored(stored: dict[TP, tuple[set[int], int]],
                 headers: Iterable[tuple[str, str | bytes | None]]) -> bool:
    h = header_map(list(headers))
    try:
        key = (h["loadcast.source_topic"], int(h["loadcast.partition"]))
        offset = int(h["loadcast.offset"])
    except (KeyError, ValueError):
        return False
    s = stored.get(key)
    return s is not None and offset in s[0]


def _timestamp(msg: Message) -> int | None:
    kind, ts = msg.timestamp()
    return ts if kind != 0 and ts > 0 else None  # 0: TIMESTAMP_NOT_AVAILABLE


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def describe(stats: SinkStats) -> dict[str, Any]:
    """Stats as a plain dict (for logs and the admin endpoint)."""
    return dict(stats.__dict__)
