"""Telemetry that ClickHouse decodes itself: the sink's fast path for the telemetry topic.

Decoding Avro in Python costs the sink about 12 µs per window (decode, range checks,
conversion), which caps it far below what ClickHouse can insert. For the telemetry topic,
where the volume is, the sink instead hands ClickHouse the Avro bodies as they came off
Kafka: it wraps them in one Avro object container file per insert and ClickHouse's own
Avro reader parses them.

How, without decoding in Python:

- An Avro record is the concatenation of its fields' encodings, so the body of a Kafka
  value (after the 5-byte Confluent header) prefixed with the encodings of ``_topic``,
  ``_partition`` and ``_offset`` is a valid datum of a *wrapper* schema whose fields are
  those three followed by the value schema's fields: per record, a short fastavro encode
  and a join.
- The container goes into a ``Null`` table (:meth:`FastPath.ddl`); a materialized view turns
  its rows into ``telemetry`` rows (``ARRAY JOIN`` for TelemetryBatch windows, with
  ``_idx`` = position in the batch), exactly as :func:`sinks.convert.telemetry_row` does.
- The same range rules as the codec (``loadcast.min``/``loadcast.max``, finite doubles),
  the converter (timestamps in 1900..2299) and :mod:`schemas.validation` (window order,
  span, clock skew against the ``_ref`` coordinate) are checked in the view.
  A violation makes the view throw, so the whole insert fails and stores
  nothing; the sink then decodes that batch in Python, which dead-letters the bad records
  one by one with their reason. Garbage that ClickHouse cannot parse takes the same way.

Only values written with the current EndpointTelemetry or TelemetryBatch schema id take
this path (:meth:`FastPath.table_for`); anything else (older versions, other schemas,
garbage) is decoded in Python as before.

>>> from schemas.codec import Codec
>>> fast = FastPath(Codec.embedded())
>>> [t.table[:-11] for t in fast.tables]
['ingest_telemetry', 'ingest_telemetry_batch']

The ingest tables are named after a digest of their definition (wrapper schema and view),
so a sink with another schema version creates its own pair next to the old one instead of
replacing a view another sink may be inserting through. They hold no data (``Null``).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fastavro

from schemas.codec import MAGIC, Codec
from schemas.files import plain
from schemas.validation import DEFAULT_LIMITS, Limits, reference_ms, telemetry_sql
from sinks.convert import _MAX_MS, _MIN_MS

HEADER_BYTES = 5  # Confluent wire format: magic byte + 4-byte schema id

# telemetry columns from one EndpointTelemetry tuple ``{w}`` (``w.`` inside a batch).
_TELEMETRY_SELECT = """
  {w}endpoint_id AS endpoint_id, {w}region AS region, {w}api AS api,
  {w}agent_id AS agent_id,
  fromUnixTimestamp64Milli({w}window_start, 'UTC') AS window_start,
  fromUnixTimestamp64Milli({w}window_end, 'UTC') AS window_end,
  toUInt32({w}interval_ms) AS interval_ms, toUInt64({w}request_count) AS request_count,
  map('4xx', toUInt64({w}errors_4xx), '5xx', toUInt64({w}errors_5xx),
      'connect', toUInt64({w}errors_connect), 'timeout', toUInt64({w}errors_timeout))
    AS errors,
  {w}latency_p50_ms AS latency_p50_ms, {w}latency_p95_ms AS latency_p95_ms,
  {w}latency_p99_ms AS latency_p99_ms, {w}latency_max_ms AS latency_max_ms,
  {w}cpu_percent AS cpu_percent, {w}memory_percent AS memory_percent,
  toUInt64({w}net_in_bytes) AS net_in_bytes, toUInt64({w}net_out_bytes) AS net_out_bytes,
  toUInt32({w}in_flight) AS in_flight,
  CAST({w}distinct_clients, 'Nullable(UInt64)') AS distinct_clients,
  {w}attributes AS attributes"""

_COORDINATES: tuple[dict[str, Any], ...] = (
    {"name": "_topic", "type": "string"},
    {"name": "_partition", "type": "int"},
    {"name": "_offset", "type": "long"},
    # The reference time of schemas.validation (epoch ms) the window rules are judged by.
    {"name": "_ref", "type": "long"},
)


def clickhouse_type(avro: Any) -> str:
    """The ClickHouse column type ClickHouse's Avro reader fills from an Avro type.

    >>> clickhouse_type(["null", "long"])
    'Nullable(Int64)'
    >>> clickhouse_type({"type": "map", "values": "string"})
    'Map(String, String)'
    """
    simple = {"string": "String", "bytes": "String", "int": "Int32", "long": "Int64",
              "float": "Float32", "double": "Float64", "boolean": "Bool"}
    if isinstance(avro, str):
        if avro in simple:
            return simple[avro]
        raise ValueError(f"no ClickHouse type for Avro {avro!r}")
    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        if len(branches) != 1:
            raise ValueError(f"only [null, T] unions are supported, not {avro!r}")
        inner = clickhouse_type(branches[0])
        return f"Nullable({inner})" if "null" in avro else inner
    kind = avro["type"]
    if kind == "map":
        return f"Map(String, {clickhouse_type(avro['values'])})"
    if kind == "array":
        return f"Array({clickhouse_type(avro['items'])})"
    if kind == "record":
        fields = ", ".join(f"{f['name']} {clickhouse_type(f['type'])}" for f in avro["fields"])
        return f"Tuple({fields})"
    return clickhouse_type(kind)


def _base(t: Any) -> Any:
    if isinstance(t, list):
        branches = [b for b in t if b != "null"]
        return branches[0] if len(branches) == 1 else None
    return t


def range_predicate(schema: Mapping[str, Any], prefix: str = "") -> str:
    """SQL that is true when a record obeys the codec's range rules and fits the columns.

    Mirrors :func:`schemas.codec.compile_checks` (``loadcast.min``/``max``; doubles
    finite) and the converter's timestamp bound, for the scalar fields of ``schema``.

    >>> range_predicate({"fields": [{"name": "n", "type": "long", "loadcast.min": 0}]})
    '(n >= 0)'
    """
    terms: list[str] = []
    for field in schema["fields"]:
        col = f"{prefix}{field['name']}"
        t = field["type"]
        base = _base(t)
        kind = base.get("type") if isinstance(base, dict) else base
        logical = base.get("logicalType") if isinstance(base, dict) else None
        parts: list[str] = []
        if kind in ("double", "float"):
            parts.append(f"isFinite({col})")
        if kind in ("int", "long", "double", "float"):
            if field.get("loadcast.min") is not None:
                parts.append(f"{col} >= {field['loadcast.min']}")
            if field.get("loadcast.max") is not None:
                parts.append(f"{col} <= {field['loadcast.max']}")
        if logical in ("timestamp-millis",):
            parts.append(f"{col} BETWEEN {_MIN_MS} AND {_MAX_MS}")
        if not parts:
            continue
        term = " AND ".join(parts)
        terms.append(f"({col} IS NULL OR {term})" if isinstance(t, list) else f"({term})")
    return " AND ".join(terms) or "1"


@dataclass(frozen=True)
class IngestTable:
    """One schema whose values ClickHouse decodes: its Null table and wrapper schema."""

    schema_name: str
    table: str
    schema_id: int
    writer_schema: dict[str, Any]  # the wrapper: coordinates + the value's fields
    batch: bool  # TelemetryBatch: one row per window
    header: bytes  # of an object container of writer_schema; ends in its sync marker

    @property
    def prefix(self) -> bytes:
        """The Confluent header values of this schema start with."""
        return bytes([MAGIC]) + self.schema_id.to_bytes(4, "big")


_COORDINATE_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "Coordinates", "namespace": "loadcast.ingest",
    "fields": list(_COORDINATES),
})
# The fields of TelemetryBatch before its windows array (to reach the array's count).
_BATCH_HEAD_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "BatchHead", "namespace": "loadcast.ingest",
    "fields": [{"name": "agent_id", "type": "string"}, {"name": "region", "type": "string"},
               {"name": "created_at", "type": "long"}],
})


def _encode(schema: Any, datum: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, datum)
    return buf.getvalue()


def batch_windows(value: bytes) -> int:
    """Windows in a TelemetryBatch value, read from its array header (no decoding).

    Counts the first array block, which is the whole array for every Avro writer that
    writes arrays in one block (fastavro, librdkafka's serializers, the Java client).
    """
    buf = io.BytesIO(memoryview(value)[HEADER_BYTES:])
    fastavro.schemaless_reader(buf, _BATCH_HEAD_SCHEMA)  # leaves buf at the array
    count = fastavro.schemaless_reader(buf, "long")
    assert isinstance(count, int)
    return abs(count)


class FastPath:
    """The ingest tables for ``codec``'s current telemetry schemas, and their containers."""

    def __init__(self, codec: Codec, limits: Limits = DEFAULT_LIMITS) -> None:
        single = codec.schema("loadcast.EndpointTelemetry")
        self.tables: list[IngestTable] = []
        self._ddl: list[str] = []
        for name, stem, batch in (("loadcast.EndpointTelemetry", "ingest_telemetry", False),
                                  ("loadcast.TelemetryBatch", "ingest_telemetry_batch", True)):
            value = codec.schema(name)
            wrapper = {
                "type": "record", "name": f"{stem}_row", "namespace": "loadcast.ingest",
                "fields": [*_COORDINATES, *plain(value)["fields"]],
            }
            columns = tuple((f["name"], clickhouse_type(f["type"])) for f in wrapper["fields"])
            cols = ",\n  ".join(f"{c} {typ}" for c, typ in columns)
            if batch:
                select = _TELEMETRY_SELECT.format(w="w.")
                # The batch's own fields become no column (as in sinks.convert).
                check = range_predicate(single, "w.") + " AND " + telemetry_sql(
                    "w.", "_ref", limits)
                source = "ARRAY JOIN windows AS w, arrayEnumerate(windows) AS i"
                idx = "toUInt32(i - 1)"
            else:
                select = _TELEMETRY_SELECT.format(w="")
                check = range_predicate(single) + " AND " + telemetry_sql("", "_ref", limits)
                source = ""
                idx = "toUInt32(0)"
            view = (
                "SELECT _topic, toUInt32(_partition) AS _partition, "
                f"toUInt64(_offset) AS _offset, {idx} AS _idx,{select}\n"
                "FROM {table}\n" + source + "\n"
                # The view throws on the first bad row: the insert then stores nothing
                # and the sink decodes the batch in Python to dead-letter exactly it.
                f"WHERE throwIf(NOT ({check}), 'loadcast: out_of_range') = 0"
            )
            digest = hashlib.sha256(f"{cols}\n{view}".encode()).hexdigest()[:10]
            table = f"{stem}_{digest}"
            self._ddl.append(f"CREATE TABLE IF NOT EXISTS {table} (\n  {cols}\n) ENGINE = Null")
            self._ddl.append(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {table}_mv TO telemetry AS\n"
                             + view.replace("{table}", table))
            buf = io.BytesIO()
            # An empty container is exactly the header (schema + sync marker) we need.
            fastavro.writer(buf, fastavro.parse_schema(wrapper), [])
            self.tables.append(IngestTable(name, table, codec.schema_id(name), wrapper, batch,
                                           buf.getvalue()))
        self._by_prefix = {t.prefix: t for t in self.tables}

    def ddl(self) -> list[str]:
        """The Null tables and the views that turn their rows into telemetry rows
        (idempotent; run after the numbered migrations, which create ``telemetry``)."""
        return list(self._ddl)

    def table_for(self, value: bytes) -> IngestTable | None:
        """The ingest table for a raw Kafka value, or None (decode it in Python)."""
        return self._by_prefix.get(value[:HEADER_BYTES])

    def container(self, t: IngestTable, records: Iterable[tuple[str, int, int, bytes]],
                  refs: Iterable[int] | None = None) -> bytes:
        """One Avro object container of ``(topic, partition, offset, value)`` records;
        ``refs`` are their reference times (:func:`schemas.validation.reference_ms`,
        default: now)."""
        parts: list[bytes | memoryview] = []
        now = reference_ms()
        ref_of = iter(refs) if refs is not None else None
        for topic, partition, offset, value in records:
            ref = next(ref_of) if ref_of is not None else now
            parts.append(_encode(_COORDINATE_SCHEMA, {
                "_topic": topic, "_partition": partition, "_offset": offset, "_ref": ref}))
            parts.append(memoryview(value)[HEADER_BYTES:])
        body = b"".join(parts)
        # One block: record count, byte size, the records, the header's sync marker.
        return b"".join((t.header, _encode("long", len(parts) // 2),
                         _encode("long", len(body)), body, t.header[-16:]))

    def expired(self, t: IngestTable, values: Sequence[bytes], cutoff_ms: int) -> tuple[int, int]:
        """(telemetry rows with window_start before ``cutoff_ms``, the newest such start),
        read from each value's first window (one interval per batch), without decoding.

        Reading a start costs a few µs, so 17 values spread over ``values`` are read first
        and the rest only when one of them is within a day of the cutoff (a live stream
        pays almost nothing; a replay of old dates is counted exactly).
        """
        if not values:
            return 0, 0
        step = max(1, len(values) // 16)
        margin = cutoff_ms + 86_400_000
        for v in [*values[::step], values[-1]]:
            try:
                start, windows = _first_window_start(v, t.batch)
            except (IndexError, ValueError):
                continue
            if windows and start < margin:
                break
        else:
            return 0, 0
        n, newest = 0, 0
        for v in values:
            try:
                start, windows = _first_window_start(v, t.batch)
            except (IndexError, ValueError):
                continue  # garbage: ClickHouse refuses it and the sink dead-letters it
            if windows and start < cutoff_ms:
                n += windows
                newest = max(newest, start)
        return n, newest

    def rows(self, t: IngestTable, values: Sequence[bytes]) -> int:
        """telemetry rows the values make (windows of batches; one per single value)."""
        if not t.batch:
            return len(values)
        return sum(batch_windows(v) for v in values)


def _long(b: bytes, i: int) -> tuple[int, int]:
    """A zig-zag varint at ``b[i]``: (value, next index)."""
    shift = acc = 0
    while True:
        byte = b[i]
        i += 1
        acc |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (acc >> 1) ^ -(acc & 1), i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _skip_strings(b: bytes, i: int, count: int) -> int:
    for _ in range(count):
        size = b[i]
        if size < 0x80:  # the usual one-byte length
            i += 1 + (size >> 1)
            if size & 1:
                raise ValueError("negative string length")
            continue
        size, i = _long(b, i)
        if size < 0:
            raise ValueError("negative string length")
        i += size
    return i


def _first_window_start(value: bytes, batch: bool) -> tuple[int, int]:
    """(window_start of the first window, windows in the value) of a telemetry value.

    Relies on the field order of EndpointTelemetry (endpoint_id, region, api, agent_id,
    window_start) and TelemetryBatch (agent_id, region, created_at, windows).
    """
    i, windows = HEADER_BYTES, 1
    if batch:
        i = _skip_strings(value, i, 2)
        _, i = _long(value, i)  # created_at
        windows, i = _long(value, i)
        if windows < 0:  # a block with its byte size
            windows = -windows
            _, i = _long(value, i)
        if windows == 0:
            return 0, 0
    i = _skip_strings(value, i, 4)
    start, _ = _long(value, i)
    return start, windows
