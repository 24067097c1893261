"""Canned queries on embedded chDB with synthetic rows (mirroring and routing records are
not produced by the pipeline yet): mirror-lead-time and routing-shares give the numbers
worked out here by hand."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sinks.convert import rows_for
from sinks.db import connect
from sinks.ddl import TABLE_BY_TOPIC, migrate
from sinks.queries import run_canned, run_sql
from sinks.settings import SinkSettings

T = (time.time_ns() // 1_000_000) // 60_000 * 60_000 - 30 * 60_000


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Any]:
    settings = SinkSettings(dsn=f"chdb://{tmp_path}/ch")
    c = connect(settings)
    migrate(c, settings.ttl_days)
    try:
        yield c
    finally:
        c.close()


def insert(client: Any, topic: str, records: list[dict[str, Any]]) -> None:
    spec = TABLE_BY_TOPIC[topic]
    rows = [(f"x.{topic}", 0, off, i, *r) for off, rec in enumerate(records)
            for i, r in enumerate(rows_for(topic, rec))]
    client.insert(spec.name, list(zip(*rows, strict=True)), column_names=spec.insert_columns,
                  column_oriented=True)


def status(command: str, state: str, at: int) -> dict[str, Any]:
    return {"executor_id": "x1", "region": "eu", "api": "orders", "command_id": command,
            "sequence": 1, "state": state, "at": at}


def score(at: int, current: float, capacity: float = 10.0) -> dict[str, Any]:
    return {"endpoint_id": "central-1", "api": "orders", "region": "central",
            "computed_at": at, "valid_until": at + 60_000, "score": 0.5,
            "capacity_rps": capacity, "current_rps": current, "predicted_utilization": 0.5,
            "latency_p99_ms": 10.0, "error_rate": 0.0, "step_seconds": 60, "forecast": []}


def test_mirror_lead_time(client: Any) -> None:
    s = 1000
    insert(client, "mirror-status", [
        status("c1", "ACCEPTED", T), status("c1", "STARTING", T + 10 * s),
        status("c1", "READY", T + 40 * s), status("c1", "READY", T + 45 * s),  # repeat
        status("c2", "ACCEPTED", T + 200 * s), status("c2", "READY", T + 230 * s),
        status("c3", "ACCEPTED", T + 250 * s), status("c3", "FAILED", T + 260 * s),
    ])
    insert(client, "load-scores", [
        score(T + 20 * s, 5.0), score(T + 100 * s, 12.0), score(T + 110 * s, 13.0),
        score(T + 300 * s, 11.0),
    ])
    params = {"since_ms": T - 3_600_000, "until_ms": T + 3_600_000}
    rows = run_canned(client, "mirror-lead-time", params)
    got = {r[2]: dict(zip(rows.columns, r, strict=True)) for r in rows.rows}
    assert set(got) == {"c1", "c2"}  # c3 never became ready
    # c1: ready at +40 s, demand first above central capacity at +100 s: 60 s early.
    assert got["c1"]["lead_seconds"] == 60.0
    # c2 with the default look-back finds that same crossing: ready 130 s late.
    assert got["c2"]["lead_seconds"] == -130.0
    # Without look-back, c2 waits for the next crossing after it began (+300 s): 70 s early.
    rows = run_canned(client, "mirror-lead-time", {**params, "lookback_s": 0})
    got = {r[2]: dict(zip(rows.columns, r, strict=True)) for r in rows.rows}
    assert got["c1"]["lead_seconds"] == 60.0 and got["c2"]["lead_seconds"] == 70.0


def test_routing_shares_and_stale_periods(client: Any) -> None:
    def window(ep: str, n: int) -> dict[str, Any]:
        return {"endpoint_id": ep, "region": "eu", "api": "orders", "agent_id": "a",
                "window_start": T, "window_end": T + 60_000, "interval_ms": 60_000,
                "request_count": n, "errors_4xx": 0, "errors_5xx": 0, "errors_connect": 0,
                "latency_p50_ms": 1.0, "latency_p95_ms": 2.0, "latency_p99_ms": 3.0,
                "latency_max_ms": 4.0, "cpu_percent": 1.0, "memory_percent": 1.0,
                "net_in_bytes": 0, "net_out_bytes": 0}

    insert(client, "telemetry", [window("e1", 30), window("e2", 90)])
    decision = {"sidecar_id": "s", "region": "eu", "api": "orders", "policy": "score"}
    insert(client, "routing-decisions", [
        {**decision, "at": T + 1000, "kind": "WEIGHTS", "stale": False,
         "weights": {"e1": 0.2, "e2": 0.8}},
        {**decision, "at": T + 2000, "kind": "WEIGHTS", "stale": True,
         "weights": {"e1": 0.4, "e2": 0.6}},
        {**decision, "at": T + 3000, "kind": "REQUEST", "stale": True, "endpoint_id": "e2"},
        {**decision, "at": T + 4000, "kind": "REQUEST", "stale": False, "endpoint_id": "e2"},
        {**decision, "at": T + 5000, "kind": "REQUEST", "stale": False, "endpoint_id": "e1"},
        {**decision, "at": T + 6000, "kind": "REQUEST", "stale": False, "endpoint_id": "e2"},
    ])
    r = run_canned(client, "routing-shares", {"since_ms": T - 60_000, "until_ms": T + 60_000})
    got = {row[2]: dict(zip(r.columns, row, strict=True)) for row in r.rows}
    assert got["e1"]["share"] == 0.25 and got["e2"]["share"] == 0.75
    assert got["e1"]["routed_share"] == 0.25 and got["e2"]["routed_share"] == 0.75
    assert got["e1"]["mean_weight"] == pytest.approx(0.3)
    assert got["e2"]["stale_fraction"] == pytest.approx(2 / 6, abs=1e-6)
    # --sql binds parameters; it cannot write.
    n = run_sql(client, "SELECT count() AS n FROM telemetry WHERE request_count > {k:UInt32}",
                {"k": 50})
    assert n.rows == [[1]]
    with pytest.raises(Exception, match=r"(?i)readonly"):
        run_sql(client, "DROP TABLE telemetry")
