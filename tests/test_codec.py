"""The codec: Confluent wire format, evolution, reference-library compatibility, bad input."""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import fields
from typing import Any

import avro.io
import avro.schema
import fastavro
import pytest

from schemas import records
from schemas.codec import Codec, CodecError
from schemas.files import (
    SCHEMA_DIR,
    current_schema_files,
    expand,
    fingerprint,
    plain,
    registry_text,
)
from schemas.ids import missing_rows


def telemetry(**over: Any) -> dict[str, Any]:
    r: dict[str, Any] = dict(
        endpoint_id="orders-1", region="eu-west", api="orders", agent_id="a1",
        window_start=1_700_000_000_000, window_end=1_700_000_005_000, interval_ms=5000,
        request_count=120, errors_4xx=2, errors_5xx=1, errors_connect=0,
        latency_p50_ms=12.5, latency_p95_ms=40.0, latency_p99_ms=80.0, latency_max_ms=120.0,
        cpu_percent=35.0, memory_percent=60.0, net_in_bytes=1000, net_out_bytes=3000,
        in_flight=3, errors_timeout=0, distinct_clients=9, attributes={"zone": "a"},
    )
    r.update(over)
    return r


def test_round_trip_every_field(codec: Codec) -> None:
    data = codec.encode("EndpointTelemetry", telemetry())
    assert data[0] == 0
    assert struct.unpack(">I", data[1:5])[0] == codec.schema_id("EndpointTelemetry")
    assert codec.decode(data, "EndpointTelemetry") == telemetry()


def test_apache_avro_reference_reads_our_body(codec: Codec) -> None:
    """The reference implementation, given only the .avsc file, decodes what we write."""
    data = codec.encode("EndpointTelemetry", telemetry())
    schema = avro.schema.parse((SCHEMA_DIR / "EndpointTelemetry.avsc").read_text())
    reader = avro.io.DatumReader(schema)
    decoded: Any = reader.read(avro.io.BinaryDecoder(io.BytesIO(data[5:])))
    want = telemetry()
    for k in ("window_start", "window_end"):  # avro returns timestamp-millis as datetime
        decoded[k] = round(decoded[k].timestamp() * 1000)
    assert decoded == want


def _write_with(schema_file: str, record: dict[str, Any], schema_id: int) -> bytes:
    schema = fastavro.parse_schema(plain(json.loads((SCHEMA_DIR / schema_file).read_text())))
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, schema_id))
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def test_old_version_is_read_by_new(codec: Codec) -> None:
    """An agent on schema v1 (id 1, no in_flight/distinct_clients…) is read with defaults."""
    old = {k: v for k, v in telemetry().items()
           if k not in ("in_flight", "errors_timeout", "distinct_clients", "attributes")}
    data = _write_with("history/EndpointTelemetry.v1.avsc", old, 1)
    got = codec.decode(data, "EndpointTelemetry")
    assert got == {**old, "in_flight": 0, "errors_timeout": 0, "distinct_clients": None,
                   "attributes": {}}


def test_new_version_is_read_by_old_reader(codec: Codec) -> None:
    """A consumer still on v1 reads records written with the current version."""
    data = codec.encode("EndpointTelemetry", telemetry())
    v1 = fastavro.parse_schema(
        plain(json.loads((SCHEMA_DIR / "history/EndpointTelemetry.v1.avsc").read_text()))
    )
    current = fastavro.parse_schema(plain(codec.schema("EndpointTelemetry")))
    got: Any = fastavro.schemaless_reader(io.BytesIO(data[5:]), current, v1)
    assert got["request_count"] == 120
    assert "distinct_clients" not in got


def test_batch_round_trip(codec: Codec) -> None:
    batch = {"agent_id": "a1", "region": "eu", "created_at": 5,
             "windows": [telemetry(endpoint_id=f"e{i}") for i in range(50)]}
    assert codec.decode(codec.encode("TelemetryBatch", batch)) == batch
    assert codec.name_of(codec.encode("TelemetryBatch", batch)) == "loadcast.TelemetryBatch"


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: b"\x01" + d[1:], "bad_magic"),
        (lambda d: d[:3], "truncated"),
        (lambda d: d[:-7], "truncated"),
        (lambda d: d[:1] + struct.pack(">I", 9999) + d[5:], "unknown_schema_id"),
        (lambda d: d + b"\x00\x01", "invalid"),
    ],
)
def test_bad_bytes_give_one_typed_error(codec: Codec, mangle: Any, reason: str) -> None:
    data = codec.encode("EndpointTelemetry", telemetry())
    with pytest.raises(CodecError) as e:
        codec.decode(mangle(data), "EndpointTelemetry")
    assert e.value.reason == reason
    assert reason in str(e.value)


def test_wrong_schema_is_refused(codec: Codec) -> None:
    data = codec.encode("ForecastPoint", {"horizon": 1, "at": 0, "mean": 1.0, "lower": 0.0,
                                          "upper": 2.0})
    with pytest.raises(CodecError) as e:
        codec.decode(data, "EndpointTelemetry")
    assert e.value.reason == "wrong_schema"


@pytest.mark.parametrize(
    ("field", "value"),
    [("request_count", -1), ("latency_p99_ms", math.nan), ("latency_p50_ms", -3.0),
     ("cpu_percent", 140.0), ("latency_max_ms", math.inf)],
)
def test_out_of_range_is_refused_both_ways(codec: Codec, field: str, value: Any) -> None:
    with pytest.raises(CodecError) as e:
        codec.encode("EndpointTelemetry", telemetry(**{field: value}))
    assert e.value.reason == "out_of_range" and field in str(e.value)
    # A producer that does not validate still cannot get it past a decoder.
    lax = Codec(codec.ids, validate_on_encode=False)
    with pytest.raises(CodecError) as e:
        codec.decode(lax.encode("EndpointTelemetry", telemetry(**{field: value})))
    assert e.value.reason == "out_of_range" and field in str(e.value)


def test_out_of_range_inside_a_batch_names_the_window(codec: Codec) -> None:
    batch = {"agent_id": "a", "region": "r", "created_at": 0,
             "windows": [telemetry(), telemetry(request_count=-5)]}
    with pytest.raises(CodecError, match=r"windows\[1\]\.request_count"):
        codec.encode("TelemetryBatch", batch)


def test_missing_field_is_invalid(codec: Codec) -> None:
    r = telemetry()
    del r["api"]
    with pytest.raises(CodecError) as e:
        codec.encode("EndpointTelemetry", r)
    assert e.value.reason == "invalid"


def test_id_table_covers_every_schema_file() -> None:
    """Changing a .avsc without a new row in ids.json would break every reader."""
    rows = json.loads((SCHEMA_DIR / "ids.json").read_text())
    assert missing_rows(rows) == []
    assert len({r["id"] for r in rows}) == len(rows)
    assert {f"loadcast.{p.stem}" for p in SCHEMA_DIR.glob("*.avsc")} == set(current_schema_files())


def test_ids_are_deterministic_across_codecs() -> None:
    a, b = Codec.embedded(), Codec.embedded()
    for name in current_schema_files():
        assert a.schema_id(name) == b.schema_id(name)


@pytest.mark.parametrize(("cls", "schema"), [(records.LoadScore, "LoadScore"),
                                              (records.RoutingDecision, "RoutingDecision"),
                                              (records.ForecastPoint, "ForecastPoint")])
def test_typed_views_match_schemas(codec: Codec, cls: Any, schema: str) -> None:
    assert [f.name for f in fields(cls)] == [f["name"] for f in codec.schema(schema)["fields"]]


def test_typed_telemetry_matches_schema(codec: Codec) -> None:
    assert list(records.EndpointTelemetry.__annotations__) == [
        f["name"] for f in codec.schema("EndpointTelemetry")["fields"]
    ]


def test_registry_url_selects_the_registry_codec() -> None:
    """Every process picks its codec the same way: registry if configured, else embedded."""
    from schemas.codec import EmbeddedIds, RegistryIds

    assert isinstance(Codec.for_registry(None).ids, EmbeddedIds)
    assert isinstance(Codec.for_registry("http://127.0.0.1:9").ids, RegistryIds)


@pytest.mark.parametrize("path", sorted(SCHEMA_DIR.glob("*.avsc")), ids=lambda p: p.name)
def test_each_schema_file_parses_alone_with_apache_avro(path: Any) -> None:
    """Any Avro tool reads each .avsc on its own (a referenced type is defined where it is
    first used), and what the Apache library reads is the schema loadcast writes with."""
    parsed: Any = avro.schema.parse(path.read_text())
    assert parsed.fullname == f"loadcast.{path.stem}"
    ours = Codec.embedded().schema(parsed.fullname)
    alone = expand(json.loads(path.read_text()), {})  # no other file's types at hand
    assert fingerprint(alone) == fingerprint(ours)


def test_inlined_types_are_copies_of_their_own_files() -> None:
    """A named type defined inside another file (ForecastPoint in LoadScore, ...) is
    exactly its own .avsc, so the copies cannot drift apart."""
    own = {f"loadcast.{p.stem}": json.loads(p.read_text()) for p in SCHEMA_DIR.glob("*.avsc")}

    def walk(node: Any, found: list[dict[str, Any]]) -> None:
        if isinstance(node, dict):
            if node.get("type") == "record":
                found.append(node)
            for v in node.values():
                walk(v, found)
        elif isinstance(node, list):
            for v in node:
                walk(v, found)

    inlined = 0
    for name, schema in own.items():
        found: list[dict[str, Any]] = []
        walk(schema["fields"], found)
        for rec in found:
            full = f"{rec.get('namespace', 'loadcast')}.{rec['name']}"
            assert rec == own[full], f"{name}: inline {full} differs from {full}.avsc"
            inlined += 1
    assert inlined >= 5


def test_registry_gets_clean_self_contained_schemas_with_the_embedded_fingerprints() -> None:
    """What a Schema Registry is sent: no fastavro internals, each named type defined once
    (Avro's Java and Python parsers refuse a repeated definition), parses alone, and is the
    schema of its row in ids.json (the same schema as before the types were inlined)."""
    codec = Codec.embedded()
    rows = {r["fingerprint"]: r["id"] for r in json.loads((SCHEMA_DIR / "ids.json").read_text())}
    for name in current_schema_files():
        text = registry_text(codec.schema(name))
        assert "__fastavro" not in text and "__named" not in text
        parsed = avro.schema.parse(text)
        own = avro.schema.parse((SCHEMA_DIR / f"{name.split('.')[1]}.avsc").read_text())
        assert parsed.canonical_form == own.canonical_form
        assert rows[fingerprint(expand(json.loads(text), {}))] == codec.schema_id(name)
