"""The sink's ClickHouse writer: records into a batch of rows, the batch into ClickHouse.

:meth:`ClickHouseWriter.add` decodes a record (or keeps a telemetry value raw for
ClickHouse to decode, :mod:`sinks.avro_ingest`) and turns it into rows of its table
(:mod:`sinks.convert`), or into a dead letter (:mod:`streams.kafka.deadletter`) when it does not
decode, convert or validate. :meth:`ClickHouseWriter.write` inserts one columnar block per
table with a deduplication token; rows ClickHouse refuses are found by bisection and
dead-lettered one by one (reason ``insert_refused``). Committing offsets is the consumer
loop's job (:mod:`sinks.sink`), after every insert of the batch succeeded.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from confluent_kafka import Message

from schemas.codec import Codec, CodecError, Record
from schemas.validation import (
    Limits,
    reencode,
    reference_ms,
    score_problem,
    telemetry_problem,
    window_problem,
)
from sinks import metrics
from sinks.avro_ingest import FastPath, IngestTable
from sinks.convert import (
    TOPIC_SCHEMAS,
    ConversionError,
    Row,
    dead_letter_row,
    rows_for,
    telemetry_row,
)
from sinks.db import ClickHouseUnavailable, close_quietly
from sinks.ddl import TABLE_BY_NAME, TABLE_BY_TOPIC, migrate
from sinks.settings import SinkSettings
from streams.kafka.deadletter import DeadLetter, DeadLetterWriter, LogThrottle

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

TP = tuple[str, int]  # (full topic name, partition)


@dataclass
class Batch:
    """Rows (and raw telemetry values, and dead letters) of the records consumed since
    the last commit, and the offsets they span."""

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


class ClickHouseWriter:
    """Batch rows of the sink's topics and insert them; see the module docstring."""

    def __init__(self, settings: SinkSettings, codec: Codec, limits: Limits,
                 topics: dict[str, str], dead_letters: DeadLetterWriter,
                 client_factory: Callable[[], Client]) -> None:
        self.settings = settings
        self.codec = codec
        self.limits = limits
        self.topics = topics  # full name -> catalog name
        self.dead_letters = dead_letters
        self.dead_letter_topic = dead_letters.topic
        self._log = LogThrottle()
        self._sinks_dead_letter = "dead-letter" in settings.topics
        self._client_factory = client_factory
        self.fast = FastPath(codec, limits) if settings.decode_in_clickhouse else None
        self.fast_tables: dict[str, IngestTable] = (
            {t.table: t for t in self.fast.tables} if self.fast else {}
        )
        self.batch = Batch()
        self.client: Client | None = None
        self.ready = threading.Event()  # set once ClickHouse is open and migrated

    # ------------------------------------------------------------------ records

    def add(self, msg: Message) -> None:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        assert topic is not None and partition is not None and offset is not None
        b = self.batch
        b.note((topic, partition), offset)
        short = self.topics[topic]
        value = msg.value()
        if short == "dead-letter":
            ts = msg.timestamp()[1]
            row = dead_letter_row(
                topic, partition, offset, ts if ts > 0 else now_ms(), msg.key(), value,
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
        try:
            name = self.codec.name_of(value)
            if name not in TOPIC_SCHEMAS[short]:
                expected = " or ".join(TOPIC_SCHEMAS[short])
                raise CodecError("wrong_schema", f"{name} on {short}, expected {expected}")
            if name == "loadcast.TelemetryBatch":
                self._batch_windows(msg, self.codec.decode(value, validate=False))
                return
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
        table = self.batch.rows.setdefault(TABLE_BY_TOPIC[short].name, [])
        for i, r in enumerate(rows):
            table.append((topic, partition, offset, i, *r))

    def _batch_windows(self, msg: Message, record: Record) -> None:
        """Good windows stored, each bad one dead-lettered alone (as the worker does)."""
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        good, bad = split_batch(self.codec, record["windows"], reference_ms(timestamp(msg)),
                                self.limits)
        self.batch.rows.setdefault(TABLE_BY_TOPIC["telemetry"].name, []).extend(
            (topic, partition, offset, i, *row) for i, row in good)
        for i, w, (reason, detail) in bad:
            value = msg.value() if len(record["windows"]) == 1 else reencode(self.codec, w)
            self._dead_letter(msg, reason, f"window {i}: {reason}: {detail}", index=i,
                              key=str(w.get("endpoint_id", "")).encode(), value=value)

    def _problem(self, msg: Message, short: str, record: Record) -> tuple[str, str] | None:
        """schemas.validation's verdict (the worker's too) on a decoded value (a single
        window: batches go through :meth:`_batch_windows`)."""
        if short == "telemetry":
            return telemetry_problem(record, reference_ms(timestamp(msg)), self.limits)
        if short == "load-scores":
            return score_problem(record, reference_ms(timestamp(msg)), self.limits)
        return None

    def _dead_letter(self, msg: Message, reason: str, detail: str, *, key: bytes | None = None,
                     value: bytes | None = None, index: int = 0) -> None:
        """Dead-letter ``msg`` (or one window of a batch: its ``key``, ``value``, ``index``)."""
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        d = self.dead_letters.letter(
            msg.key() if key is None else key, msg.value() if value is None else value,
            reason=reason, detail=detail, source_topic=str(topic), partition=partition,
            offset=offset)
        self.batch.dead.append(d)
        if not self._sinks_dead_letter:
            row = dead_letter_row(
                self.dead_letter_topic, -1, -1, now_ms(), d.key, d.value,
                list(d.headers),
            )
            self.batch.rows.setdefault("dead_letter", []).append(
                (str(topic), partition, offset, index, *row)
            )
        metrics.SINK_DEAD.labels(reason).inc()
        n = self._log.due()
        if n:
            log.warning("dead-lettered %s[%s]@%s: %s (%d since the last line)", topic,
                        partition, offset, detail[:300], n)

    # ------------------------------------------------------------------ ClickHouse

    def ensure_client(self) -> Client:
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

    def drop_client(self) -> None:
        close_quietly(self.client)
        self.client = None

    def write(self, client: Client) -> int:
        """Insert the batch's tables not inserted yet (a retried batch skips those that
        succeeded); returns the rows inserted. Raises when ClickHouse fails."""
        b = self.batch
        rows = 0
        for table, msgs in b.raw.items():
            if table in b.inserted or not msgs:
                continue
            rows += self._insert_raw(client, self.fast_tables[table], msgs,
                                     f"{b.token}-{table}")
            b.inserted.add(table)
        for table, table_rows in b.rows.items():
            if table in b.inserted or not table_rows:
                continue
            rows += self._insert(client, table, table_rows, f"{b.token}-{table}")
            b.inserted.add(table)
        return rows

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
        ), refs=[reference_ms(timestamp(m)) for m in msgs])
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
            self.batch.refused += 1
            self.batch.dead.append(self.dead_letters.letter(
                None, None, reason="insert_refused", detail=str(error),
                source_topic=str(topic), partition=partition, offset=offset))
            metrics.SINK_DEAD.labels("insert_refused").inc()
            return 0
        mid = len(rows) // 2
        return (self._insert(client, table, rows[:mid], f"{token}a")
                + self._insert(client, table, rows[mid:], f"{token}b"))

    def count_expired(self) -> dict[str, int]:
        """Rows per table the table's TTL drops on insert: older than ``sink.ttl_days``
        (a replay that kept its trace's dates); counted in the metric, warned about once
        per batch."""
        b = self.batch
        days = self.settings.ttl_days
        if b.expired_checked or days <= 0:
            return {}
        b.expired_checked = True
        return _count_expired(b, days, self.fast, self.fast_tables)


def _count_expired(b: Batch, days: int, fast: FastPath | None,
                   fast_tables: dict[str, IngestTable]) -> dict[str, int]:
    cutoff = now_ms() - days * 86_400_000
    found: dict[str, tuple[int, int]] = {}  # table: (rows, newest event time ms)
    for table, rows in b.rows.items():
        spec = TABLE_BY_NAME[table]
        if table == "dead_letter" or spec.time_column not in spec.insert_columns:
            continue
        i = spec.insert_columns.index(spec.time_column)
        old = [r[i] for r in rows if isinstance(r[i], int) and r[i] < cutoff]
        if old:
            found[table] = (len(old), max(old))
    if fast is not None:
        for table, msgs in b.raw.items():
            n, newest = fast.expired(fast_tables[table], [m.value() or b"" for m in msgs],
                                     cutoff)
            if n:
                rows_before, newest_before = found.get("telemetry", (0, newest))
                found["telemetry"] = (rows_before + n, max(newest, newest_before))
    if not found:
        return {}
    for table, (n, _) in found.items():
        metrics.SINK_EXPIRED.labels(table).inc(n)
    detail = ", ".join(f"{table} {n} (newest {_iso(newest)})"
                       for table, (n, newest) in found.items())
    log.warning(
        "%d rows of this batch are older than the %d-day TTL (sink.ttl_days) and are "
        "dropped by ClickHouse at insert: %s. Replay traces re-timed (the default of "
        "`loadcast agent --replay`) or raise sink.ttl_days.",
        sum(n for n, _ in found.values()), days, detail,
    )
    return {table: n for table, (n, _) in found.items()}


def split_batch(codec: Codec, windows: list[Record], ref_ms: int, limits: Limits
                ) -> tuple[list[tuple[int, Row]], list[tuple[int, Record, tuple[str, str]]]]:
    """A batch's windows as (index, telemetry row) for the good ones and (index, window,
    (reason, detail)) for the bad ones, judged by ``schemas.validation.window_problem``."""
    good: list[tuple[int, Row]] = []
    bad: list[tuple[int, Record, tuple[str, str]]] = []
    for i, w in enumerate(windows):
        problem = window_problem(codec, w, ref_ms, limits)
        if problem is None:
            try:
                good.append((i, telemetry_row(w)))
                continue
            except (ConversionError, KeyError, TypeError, ValueError) as e:
                problem = ("unconvertible", f"{type(e).__name__}: {e}")
        bad.append((i, w, problem))
    return good, bad


def timestamp(msg: Message) -> int | None:
    kind, ts = msg.timestamp()
    return ts if kind != 0 and ts > 0 else None  # 0: TIMESTAMP_NOT_AVAILABLE


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
