"""Avro values in the Confluent wire format, with fastavro.

A value on a loadcast topic is ``0x00`` (magic byte), a 4-byte big-endian schema id, then
the Avro binary body. Any Schema Registry client can read it. Ids come from one of two
sources with one interface (:class:`SchemaIds`):

- :class:`EmbeddedIds`: the deterministic table ``schemas/ids.json`` kept in the
  repository, so every process agrees on ids without a registry;
- :class:`RegistryIds`: a Confluent-compatible Schema Registry by URL.

Timestamps (``timestamp-millis``) travel as the schema says but are plain ints (epoch
milliseconds) in the dicts the codec takes and returns: no datetime objects on the hot path.

Range rules live in the ``.avsc`` files as field properties (``"loadcast.min"``,
``"loadcast.max"``) and every double must be finite; both directions check them, so an
out-of-range value never enters or leaves a topic silently.

>>> codec = Codec.embedded()
>>> data = codec.encode("ForecastPoint", {"horizon": 1, "at": 0, "mean": 2.0,
...                                        "lower": 1.0, "upper": 3.0})
>>> data[:1], codec.decode(data, "ForecastPoint")["mean"]
(b'\\x00', 2.0)
>>> try:
...     codec.decode(b"\\x07" + data[1:])
... except CodecError as e:
...     print(e)
bad_magic: first byte is 0x07, expected 0x00 (Confluent wire format)
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import fastavro

from schemas.files import (
    NAMESPACE,
    SCHEMA_DIR,
    current_schema_files,
    expand,
    fingerprint,
    load_schema_file,
    named_schemas,
    plain,
    registry_text,
)

MAGIC = 0
_HEADER = struct.Struct(">bI")

Reason = Literal[
    "bad_magic", "truncated", "unknown_schema_id", "wrong_schema", "out_of_range", "invalid"
]
Record = dict[str, Any]


class CodecError(ValueError):
    """Any record that cannot be encoded or decoded; ``reason`` says which kind.

    Reasons: ``bad_magic``, ``truncated``, ``unknown_schema_id``, ``wrong_schema`` (a valid
    record of another type than expected), ``out_of_range`` and ``invalid`` (does not match
    the schema at all).
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason: Reason = reason
        self.detail = message


# --------------------------------------------------------------------------- range checks

Check = Callable[[Any, str], None]


def _range_error(where: str, value: Any, lo: Any, hi: Any, finite: bool) -> CodecError:
    if finite and not math.isfinite(value):
        return CodecError("out_of_range", f"{where} is {value}, must be a finite number")
    if lo is not None and value < lo:
        return CodecError("out_of_range", f"{where} is {value}, must be >= {lo}")
    return CodecError("out_of_range", f"{where} is {value}, must be <= {hi}")


def _type_name(t: Any) -> Any:
    if isinstance(t, list):  # union: check the non-null branch
        branches = [b for b in t if b != "null"]
        return _type_name(branches[0]) if len(branches) == 1 else None
    if isinstance(t, dict) and t.get("type") in ("long", "int", "double", "float"):
        return t["type"]
    return t


def compile_checks(schema: Mapping[str, Any]) -> Check:
    """Build a validator for a (parsed, expanded) record schema from its range properties.

    Numbers are checked in one loop over ``(name, min, max, must be finite)`` and a field's
    path is only formatted when it fails: the processor checks every window it applies,
    and per-field closures plus path strings were most of that cost.
    """
    numbers: list[tuple[str, Any, Any, bool]] = []
    parts: list[tuple[str, Check]] = []  # nested records, arrays and maps
    for field in schema.get("fields", []):
        name = field["name"]
        t = field["type"]
        base = _type_name(t)
        if base in ("long", "int", "double", "float"):
            lo, hi = field.get("loadcast.min"), field.get("loadcast.max")
            finite = base in ("double", "float")
            if lo is not None or hi is not None or finite:
                numbers.append((name, lo, hi, finite))
        elif isinstance(base, dict) and base.get("type") == "record":
            parts.append((name, _nested(compile_checks(base))))
        elif isinstance(base, dict) and base.get("type") == "array":
            items = base["items"]
            if isinstance(items, dict) and items.get("type") == "record":
                parts.append((name, _each(compile_checks(items))))
            elif items in ("double", "float"):
                parts.append((name, _each(_finite)))
        elif isinstance(base, dict) and base.get("type") == "map" and base["values"] == "double":
            parts.append((name, _each_value(_finite)))
    isfinite = math.isfinite

    def check(record: Any, where: str) -> None:
        get = record.get
        for name, lo, hi, finite in numbers:
            v = get(name)
            if v is None:
                continue
            if (finite and not isfinite(v)) or (lo is not None and v < lo) or (
                hi is not None and v > hi
            ):
                raise _range_error(f"{where}.{name}" if where else name, v, lo, hi, finite)
        for name, c in parts:
            c(get(name), f"{where}.{name}" if where else name)

    return check


def _finite(value: Any, where: str) -> None:
    if not math.isfinite(value):
        raise _range_error(where, value, None, None, True)


def _nested(c: Check) -> Check:
    def check(value: Any, where: str) -> None:
        if value is not None:
            c(value, where)

    return check


def _each(c: Check) -> Check:
    def check(values: Any, where: str) -> None:
        for i, v in enumerate(values or ()):
            try:
                c(v, "")
            except CodecError:
                c(v, f"{where}[{i}]")  # fails again, now with the path (only built on failure)
                raise

    return check


def _each_value(c: Check) -> Check:
    def check(values: Any, where: str) -> None:
        for k, v in (values or {}).items():
            try:
                c(v, "")
            except CodecError:
                c(v, f"{where}[{k!r}]")
                raise

    return check


# --------------------------------------------------------------------------- id sources


@dataclass(frozen=True)
class SchemaVersion:
    """One registered version of a value schema."""

    id: int
    name: str
    schema: dict[str, Any]  # self-contained (expanded)


class SchemaIds(Protocol):
    """Where schema ids come from: the embedded table or a registry."""

    def id_for(self, name: str, schema: dict[str, Any]) -> int:
        """The id under which ``schema`` (current version of ``name``) is registered."""
        ...

    def schema_for(self, schema_id: int) -> SchemaVersion | None:
        """The writer schema registered under ``schema_id``, or None if unknown."""
        ...


IDS_FILE = SCHEMA_DIR / "ids.json"


class EmbeddedIds:
    """The deterministic id table ``schemas/ids.json``.

    Each row is ``{"id", "name", "file", "fingerprint"}``; ids are never reused and a new
    version of a schema gets a new row (``tests/test_codec.py`` checks that every current
    ``.avsc`` has a row with a matching fingerprint).
    """

    def __init__(self, table_file: Path = IDS_FILE) -> None:
        rows = json.loads(table_file.read_text(encoding="utf-8"))
        named = named_schemas()
        self._by_id: dict[int, SchemaVersion] = {}
        self._by_fp: dict[str, int] = {}
        for row in rows:
            raw = load_schema_file(SCHEMA_DIR / row["file"])
            schema = expand(raw, named)
            self._by_id[row["id"]] = SchemaVersion(row["id"], row["name"], schema)
            self._by_fp[row["fingerprint"]] = row["id"]

    def id_for(self, name: str, schema: dict[str, Any]) -> int:
        fp = fingerprint(schema)
        try:
            return self._by_fp[fp]
        except KeyError:
            raise CodecError(
                "unknown_schema_id",
                f"{name} (fingerprint {fp[:12]}) has no row in {IDS_FILE.name}; "
                "add one with a new id (python -m schemas.ids --update)",
            ) from None

    def schema_for(self, schema_id: int) -> SchemaVersion | None:
        return self._by_id.get(schema_id)

    def rows(self) -> Iterable[SchemaVersion]:
        return self._by_id.values()


class RegistryIds:
    """A Confluent-compatible Schema Registry (subject per record name, ``<name>-value``)."""

    def __init__(self, url: str, config: Mapping[str, Any] | None = None) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self._client = SchemaRegistryClient({"url": url, **(config or {})})
        self._ids: dict[str, int] = {}
        self._schemas: dict[int, SchemaVersion | None] = {}

    def id_for(self, name: str, schema: dict[str, Any]) -> int:
        from confluent_kafka.schema_registry import Schema

        key = fingerprint(schema)
        if key not in self._ids:
            text = registry_text(schema)
            self._ids[key] = self._client.register_schema(f"{name}-value", Schema(text, "AVRO"))
        return self._ids[key]

    def schema_for(self, schema_id: int) -> SchemaVersion | None:
        if schema_id not in self._schemas:
            from confluent_kafka.schema_registry.error import SchemaRegistryError

            try:
                s = self._client.get_schema(schema_id)
            except SchemaRegistryError:
                self._schemas[schema_id] = None
            else:
                raw = json.loads(s.schema_str or "{}")
                name = f"{raw.get('namespace', '')}.{raw.get('name', '')}".lstrip(".")
                self._schemas[schema_id] = SchemaVersion(schema_id, name, raw)
        return self._schemas[schema_id]


# --------------------------------------------------------------------------- the codec


@dataclass
class _Writer:
    id: int
    header: bytes
    parsed: Any
    check: Check


class Codec:
    """Encode and decode loadcast values (Confluent wire format, Avro body).

    ``encode(name, record)`` writes with the current version of schema ``name`` (short
    name like ``"EndpointTelemetry"`` or full ``"loadcast.EndpointTelemetry"``);
    ``decode(data, expect=name)`` resolves the writer's version (by id) to the current one,
    so records of older and newer versions both read. Errors are :class:`CodecError`.
    """

    def __init__(self, ids: SchemaIds, *, validate_on_encode: bool = True) -> None:
        self.ids = ids
        self.validate_on_encode = validate_on_encode
        self._named = named_schemas()
        self._current: dict[str, dict[str, Any]] = {}
        self._writers: dict[str, _Writer] = {}
        self._readers: dict[tuple[int, str], tuple[Any, Any, Check]] = {}
        for name, path in current_schema_files().items():
            self._current[name] = expand(load_schema_file(path), self._named)

    @classmethod
    def embedded(cls) -> Codec:
        """A codec on the repository's deterministic id table."""
        return cls(EmbeddedIds())

    @classmethod
    def for_registry(cls, url: str | None) -> Codec:
        """The codec a process's settings ask for: a Schema Registry when ``url`` is set,
        else the embedded id table. Every process must choose the same way."""
        return cls.from_registry(url) if url else cls.embedded()

    @classmethod
    def from_registry(cls, url: str, config: Mapping[str, Any] | None = None) -> Codec:
        """A codec on a Confluent-compatible Schema Registry."""
        return cls(RegistryIds(url, config))

    @staticmethod
    def full_name(name: str) -> str:
        return name if "." in name else f"{NAMESPACE}.{name}"

    def schema(self, name: str) -> dict[str, Any]:
        """The current, self-contained schema of ``name``."""
        try:
            return self._current[self.full_name(name)]
        except KeyError:
            raise KeyError(f"no schema {name!r}; known: {sorted(self._current)}") from None

    def _writer(self, name: str) -> _Writer:
        full = self.full_name(name)
        w = self._writers.get(full)
        if w is None:
            schema = self.schema(full)
            schema_id = self.ids.id_for(full, schema)
            parsed = fastavro.parse_schema(plain(schema))
            w = _Writer(schema_id, _HEADER.pack(MAGIC, schema_id), parsed, compile_checks(schema))
            self._writers[full] = w
        return w

    def schema_id(self, name: str) -> int:
        """The id values of ``name`` are written with."""
        return self._writer(name).id

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        """One value: magic byte, schema id, Avro body."""
        w = self._writer(name)
        if self.validate_on_encode:
            w.check(record, "")
        buf = io.BytesIO()
        buf.write(w.header)
        try:
            fastavro.schemaless_writer(buf, w.parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
            raise CodecError("invalid", f"{name} does not match its schema: {e}") from e
        return buf.getvalue()

    def _reader(self, schema_id: int, expect: str | None) -> tuple[Any, Any, Check]:
        key = (schema_id, expect or "")
        cached = self._readers.get(key)
        if cached is not None:
            return cached
        version = self.ids.schema_for(schema_id)
        if version is None:
            raise CodecError("unknown_schema_id", f"schema id {schema_id} is not registered")
        target = self.full_name(expect) if expect else version.name
        if expect and version.name != target:
            raise CodecError(
                "wrong_schema",
                f"schema id {schema_id} is {version.name}, expected {target}",
            )
        writer = fastavro.parse_schema(plain(version.schema))
        current = self._current.get(target)
        reader = None
        if current is not None and fingerprint(current) != fingerprint(version.schema):
            reader = fastavro.parse_schema(plain(current))
        check = compile_checks(current if current is not None else version.schema)
        self._readers[key] = (writer, reader, check)
        return writer, reader, check

    def peek_id(self, data: bytes) -> int:
        """The schema id of a value, after checking the header."""
        if len(data) < _HEADER.size:
            raise CodecError("truncated", f"{len(data)} bytes, shorter than the 5-byte header")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise CodecError(
                "bad_magic",
                f"first byte is 0x{magic & 0xFF:02x}, expected 0x00 (Confluent wire format)",
            )
        return int(schema_id)

    def name_of(self, data: bytes) -> str:
        """The full schema name a value was written with (e.g. to tell batches from singles)."""
        schema_id = self.peek_id(data)
        version = self.ids.schema_for(schema_id)
        if version is None:
            raise CodecError("unknown_schema_id", f"schema id {schema_id} is not registered")
        return version.name

    def check(self, name: str, record: Mapping[str, Any]) -> None:
        """Raise ``CodecError("out_of_range")`` if ``record`` breaks a range rule of ``name``."""
        self._writer(name).check(record, "")

    def decode(self, data: bytes, expect: str | None = None, validate: bool = True) -> Record:
        """Decode one value; ``expect`` (a schema name) rejects values of other types.

        ``validate=False`` skips the range checks (a caller that checks parts of a record
        on its own, e.g. each window of a batch, with :meth:`check`).
        """
        schema_id = self.peek_id(data)
        writer, reader, check = self._reader(schema_id, expect)
        buf = io.BytesIO(data)
        buf.seek(_HEADER.size)
        try:
            record = fastavro.schemaless_reader(buf, writer, reader)
        except (EOFError, struct.error, IndexError) as e:
            raise CodecError("truncated", f"body ends early ({len(data)} bytes): {e}") from e
        except Exception as e:  # fastavro raises assorted types on corrupt bodies
            raise CodecError("invalid", f"body does not decode with schema {schema_id}: {e}") from e
        if buf.tell() != len(data):
            raise CodecError(
                "invalid", f"{len(data) - buf.tell()} bytes left after the record (corrupt body)"
            )
        if not isinstance(record, dict):
            raise CodecError("invalid", "value is not a record")
        if validate:
            check(record, "")
        return record
