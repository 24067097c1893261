"""The sink's offset bookkeeping: what ClickHouse already holds (exactly once in effect)
and how far behind the sink is (lag).

:class:`StoredOffsets` — on each (re-)assignment the sink asks ClickHouse which offsets at
or after the first one it re-reads are already stored, and the batch skips those records
(``loadcast_sink_already_stored``), so the raw tables *and* the rollups fed by
materialized views see each record once after a crash between insert and commit.

:class:`PartitionLag` — per assigned partition, the next offset to store (the committed
one) against the high watermark, for ``loadcast_sink_lag_records`` and the admin
endpoint; safe to read from another thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from sinks import metrics
from sinks.convert import header_map
from sinks.ddl import TABLE_BY_TOPIC

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client
    from confluent_kafka import Consumer

    from sinks.writer import Batch

log = logging.getLogger(__name__)

TP = tuple[str, int]  # (full topic name, partition)


class StoredOffsets:
    """Offsets of newly assigned partitions that ClickHouse already holds."""

    def __init__(self, topics: dict[str, str]) -> None:
        self.topics = topics  # full name -> catalog name
        self.stored: dict[TP, tuple[set[int], int]] = {}  # offsets, and the largest
        self.unchecked: set[TP] = set()  # assigned, not yet compared with ClickHouse

    def assigned(self, key: TP) -> None:
        self.unchecked.add(key)

    def revoked(self, key: TP) -> None:
        self.unchecked.discard(key)
        self.stored.pop(key, None)

    def check(self, client: Client, b: Batch) -> None:
        """Find records of newly assigned partitions that ClickHouse already holds."""
        for key in [k for k in b.first if k in self.unchecked]:
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
                self.stored[key] = (found, max(found))
                log.info("%s[%d]: %d records at or after %d already stored",
                         topic, partition, len(found), b.first[key])
            self.unchecked.discard(key)

    def filter(self, b: Batch) -> dict[str, int]:
        """Drop the batch's records ClickHouse already holds (once per batch); returns
        how many per topic."""
        if not self.stored or b.filtered:
            return {}
        skipped: dict[str, int] = {}
        for table, rows in b.rows.items():
            kept = []
            for r in rows:
                s = self.stored.get((r[0], r[1]))
                if s is not None and r[2] in s[0]:
                    if r[3] == 0:
                        skipped[r[0]] = skipped.get(r[0], 0) + 1
                    continue
                kept.append(r)
            b.rows[table] = kept
        for table, msgs in b.raw.items():
            kept_msgs = []
            for m in msgs:
                s = self.stored.get((str(m.topic()), int(m.partition() or 0)))
                if s is not None and m.offset() in s[0]:
                    skipped[str(m.topic())] = skipped.get(str(m.topic()), 0) + 1
                    continue
                kept_msgs.append(m)
            b.raw[table] = kept_msgs
        # A dead letter already in dead_letter was produced before the crash.
        b.dead = [d for d in b.dead if not _dead_stored(self.stored, d.headers)]
        for key, last in b.last.items():  # past the stored range: stop checking
            s = self.stored.get(key)
            if s is not None and last >= s[1]:
                del self.stored[key]
        b.filtered = True
        return skipped


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


class PartitionLag:
    """Records per topic not yet stored, for the assigned partitions (thread-safe)."""

    def __init__(self, topics: dict[str, str], short_topics: Iterable[str],
                 admin: Any) -> None:
        self.topics = topics  # full name -> catalog name
        self.short_topics = list(short_topics)
        self._admin_factory = admin  # () -> AdminClient, made on first use
        self._admin: AdminClient | None = None
        self.assigned: set[TP] = set()
        self.next: dict[TP, int] = {}  # next offset to store, per partition
        self.seen: dict[TP, int] = {}  # next offset after the last one consumed
        self.fetched_hwm: dict[TP, int] = {}  # high watermarks of fetch responses
        self._lag: dict[str, int] = {}
        self.lock = threading.Lock()  # guards _lag, next, assigned (lag thread)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, every: float) -> None:
        """Compute the lag every ``every`` seconds in a thread of its own."""
        self._thread = threading.Thread(target=self._loop, args=(every,), name="sink-lag",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.lag()
            except Exception as e:  # never let the metric thread die silently
                log.warning("lag not computed: %s", e)

    def on_assign(self, key: TP) -> None:
        with self.lock:
            self.assigned.add(key)
            self.next.pop(key, None)

    def on_revoke(self, key: TP) -> None:
        with self.lock:
            self.assigned.discard(key)
            self.next.pop(key, None)

    def stored_up_to(self, key: TP, nxt: int) -> None:
        with self.lock:
            self.next[key] = nxt

    def on_stats(self, stats_json: str) -> None:
        """librdkafka's statistics carry the fetch responses' high watermarks."""
        try:
            topics = json.loads(stats_json).get("topics", {})
        except ValueError:
            return
        for topic, t in topics.items():
            for p, part in t.get("partitions", {}).items():
                hi = part.get("hi_offset", -1)
                if p != "-1" and isinstance(hi, int) and hi >= 0:
                    self.fetched_hwm[(topic, int(p))] = hi

    def lag(self, timeout: float = 10.0) -> dict[str, int]:
        """Records per topic not yet stored: high watermark - next offset to store (the
        committed offset, or the earliest when nothing was committed). One ListOffsets
        request for all partitions, so it is safe to call from another thread."""
        with self.lock:
            assigned = list(self.assigned)
            nexts = {k: self.next.get(k) for k in assigned}
        latest = self._list_offsets(assigned, OffsetSpec.latest(), timeout)
        # Tansu answers ListOffsets(latest) with the last batch's base offset + 1, so also
        # take the high watermark of fetch responses and the last offset seen.
        seen = dict(self.seen)  # one C-level copy: safe against the consumer thread
        fetched = dict(self.fetched_hwm)
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
        for short in self.short_topics:
            metrics.SINK_LAG.labels(short).set(out.get(short, 0))
        with self.lock:
            self._lag = out
        return out

    def _list_offsets(self, keys: list[TP], spec: OffsetSpec, timeout: float) -> dict[TP, int]:
        if not keys:
            return {}
        if self._admin is None:
            self._admin = self._admin_factory()
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

    def last(self) -> dict[str, int]:
        """The lag as last computed (cheap; for health endpoints)."""
        with self.lock:
            return dict(self._lag)

    def fill_committed(self, consumer: Consumer) -> None:
        """Next offsets of partitions assigned since the last call (committed offsets)."""
        with self.lock:
            missing = [k for k in self.assigned if self.next.get(k) is None]
        if not missing:
            return
        try:
            tps = consumer.committed([TopicPartition(t, p) for t, p in missing], timeout=5)
        except KafkaException as e:
            log.debug("committed offsets unknown: %s", e)
            return
        with self.lock:
            for tp in tps:
                key = (tp.topic, tp.partition)
                if tp.offset >= 0 and key in self.assigned and key not in self.next:
                    self.next[key] = tp.offset
