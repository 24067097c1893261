"""Plain-value parts of the sink: conversion, query parameters, settings, admin auth."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from pydantic import ValidationError

from sinks.admin import AdminServer, make_app
from sinks.convert import ConversionError, dead_letter_row, rows_for
from sinks.ddl import TABLES, create_table_sql
from sinks.errors import QueryError
from sinks.queries import QueryResult, canned_params, parse_time
from sinks.settings import SinkSettings


def test_batch_expands_to_one_row_per_window_and_bad_values_are_refused() -> None:
    w = {"endpoint_id": "e", "region": "r", "api": "a", "agent_id": "x", "window_start": 0,
         "window_end": 5000, "interval_ms": 5000, "request_count": 3, "errors_4xx": 1,
         "errors_5xx": 2, "errors_connect": 0, "latency_p50_ms": 1.0, "latency_p95_ms": 2.0,
         "latency_p99_ms": 3.0, "latency_max_ms": 4.0, "cpu_percent": 1.0,
         "memory_percent": 1.0, "net_in_bytes": 0, "net_out_bytes": 0}
    rows = rows_for("telemetry", {"agent_id": "x", "region": "r", "created_at": 0,
                                  "windows": [w, {**w, "endpoint_id": "f"}]})
    assert [r[0] for r in rows] == ["e", "f"]
    assert rows[0][8] == {"4xx": 1, "5xx": 2, "connect": 0, "timeout": 0}
    with pytest.raises(ConversionError, match="interval_ms"):
        rows_for("telemetry", {**w, "interval_ms": 1 << 40})
    with pytest.raises(ConversionError, match="window_start"):
        rows_for("telemetry", {**w, "window_start": 10**15})
    with pytest.raises(ConversionError):
        rows_for("telemetry", {"endpoint_id": "e"})


def test_dead_letter_row_reads_source_from_headers() -> None:
    row = dead_letter_row("p.dead-letter", 1, 7, 1000, b"k", b"v", [
        ("loadcast.reason", b"bad_magic"), ("loadcast.source_topic", b"p.telemetry"),
        ("loadcast.partition", b"2"), ("loadcast.offset", b"42")])
    assert row[:4] == ("p.telemetry", 2, 42, "bad_magic")
    own = dead_letter_row("p.dead-letter", 1, 7, 1000, None, b"v", None)
    assert own[:4] == ("p.dead-letter", 1, 7, "unknown")


def test_ddl_partitions_by_day_with_ttl_and_keys_on_kafka_coordinates() -> None:
    sql = create_table_sql(TABLES[0], 30)
    assert "PARTITION BY toDate(window_start)" in sql and "INTERVAL 30 DAY" in sql
    assert "_partition, _offset, _idx)" in sql and "ReplacingMergeTree" in sql
    assert "TTL" not in create_table_sql(TABLES[0], 0)


def test_query_parameters_are_checked() -> None:
    assert parse_time("15m", now_ms=1_000_000) == 100_000
    with pytest.raises(QueryError, match="bad time"):
        parse_time("yesterday")
    with pytest.raises(QueryError, match="no query"):
        canned_params("nope", {})
    with pytest.raises(QueryError, match="takes no parameter"):
        canned_params("latency", {"limit": 3})
    with pytest.raises(QueryError, match="integer"):
        canned_params("latency", {"since_ms": "1; DROP TABLE telemetry"})
    with pytest.raises(QueryError, match="before"):
        canned_params("latency", {"since_ms": 5, "until_ms": 5})


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValidationError, match="dsn"):
        SinkSettings(dsn="mysql://x")
    with pytest.raises(ValidationError, match="unknown topics"):
        SinkSettings(topics=["telemetry", "nope"])


def test_admin_endpoint_requires_the_token_and_answers_bad_requests_with_4xx() -> None:
    seen: list[dict[str, Any]] = []

    def run(body: dict[str, Any]) -> QueryResult:
        seen.append(body)
        if body.get("query") == "nope":
            raise QueryError("no query 'nope'")
        return QueryResult(["x"], [[1]])

    server = AdminServer(make_app("s3cret", run, lambda: {"clickhouse_up": True})).start()
    try:
        assert server.host == "127.0.0.1"

        def post(body: bytes, token: str | None) -> tuple[int, dict[str, Any]]:
            req = urllib.request.Request(f"{server.url}/query", data=body, method="POST")
            if token is not None:
                req.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        assert post(b'{"query": "latency"}', None)[0] == 401
        assert post(b'{"query": "latency"}', "wrong")[0] == 401
        assert post(b'{"query": "latency"}', "s3cret") == (
            200, {"columns": ["x"], "rows": [[1]], "truncated": False})
        code, body = post(b"not json", "s3cret")
        assert code == 400 and "JSON" in body["error"]
        code, body = post(b'{"query": "nope"}', "s3cret")
        assert code == 400 and "nope" in body["error"]
        assert post(b'{"query": "a", "sql": "b"}', "s3cret")[0] == 400
        assert len(seen) == 2  # refused requests never reached the query function
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
            assert json.loads(r.read()) == {"status": "ok"}
    finally:
        server.stop()
