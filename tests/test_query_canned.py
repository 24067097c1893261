"""Canned queries on embedded chDB with synthetic rows: mirror-lead-time and routing-shares
give the numbers worked out here by hand."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from sinks.convert import rows_for
from sinks.db import connect
from sinks.ddl import TABLE_BY_TOPIC, migrate
from sinks.errors import QueryError
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


def score(endpoint: str, at_s: float, current: float, capacity: float = 10.0,
          region: str = "eu", valid_s: float = 60.0) -> dict[str, Any]:
    at = T + round(at_s * 1000)
    return {"endpoint_id": endpoint, "api": "orders", "region": region,
            "computed_at": at, "valid_until": at + round(valid_s * 1000), "score": 0.5,
            "capacity_rps": capacity, "current_rps": current, "predicted_utilization": 0.5,
            "latency_p99_ms": 10.0, "error_rate": 0.0, "step_seconds": 1, "forecast": []}


def command(command_id: str, at_s: float, central_capacity: float) -> dict[str, Any]:
    at = T + round(at_s * 1000)
    return {"command_id": command_id, "action": "ACTIVATE", "api": "orders", "region": "eu",
            "bundle_digest": "sha256:" + "a" * 64, "desired_instances": 1, "sequence": at,
            "issued_at": at, "expires_at": at + 60_000, "reason": "test",
            "central_capacity_rps": central_capacity, "forecast": [], "key_id": "k1",
            "signature": b"x"}


E1, E2, MIRROR = "orders-eu-1", "orders-eu-2", "orders-mirror-eu-127.0.0.1-9000"


def lead_rows(client: Any, **params: int) -> dict[str, dict[str, Any]]:
    rows = run_canned(client, "mirror-lead-time",
                      {"since_ms": T - 3_600_000, "until_ms": T + 3_600_000, **params})
    return {r[2]: dict(zip(rows.columns, r, strict=True)) for r in rows.rows}


def offset_s(iso: str | None) -> float | None:
    """Seconds after T of an ISO time from a query row."""
    if iso is None:
        return None
    return round(datetime.fromisoformat(iso).timestamp() - T / 1000, 3)


def test_mirror_lead_time_regional_demand(client: Any) -> None:
    """Region eu: two central endpoints of 10 rps each (central capacity 20) and, later, a
    mirror. Times in seconds after T."""
    s = 1000
    insert(client, "mirror-status", [
        # c1: ready at 40; demand crosses 20 rps at 101.
        status("c1", "ACCEPTED", T), status("c1", "STARTING", T + 10 * s),
        status("c1", "READY", T + 40 * s), status("c1", "READY", T + 45 * s),  # repeat
        status("r1", "ACCEPTED", T + 200 * s), status("r1", "RETIRED", T + 202 * s),
        # c2: ready at 310, demand stays under capacity until the next command (c3, 500).
        status("c2", "ACCEPTED", T + 300 * s), status("c2", "READY", T + 310 * s),
        # c3: ready at 505, its command says capacity 25; crossed at 600 through the mirror.
        status("c3", "ACCEPTED", T + 500 * s), status("c3", "READY", T + 505 * s),
        # c4: ordered while demand was already over capacity (since 700): late.
        status("c4", "ACCEPTED", T + 720 * s), status("c4", "READY", T + 730 * s),
        status("c5", "ACCEPTED", T + 800 * s), status("c5", "FAILED", T + 810 * s),
    ])
    insert(client, "mirror-commands", [command("c3", 499, 25.0)])
    insert(client, "load-scores", [
        # One endpoint over its own capacity long before the region's sum is.
        score(E1, 20, 12.0), score(E2, 20, 3.0),  # 15
        score("orders-central-1", 50, 500.0, region="central"),  # another region: ignored
        # the region's demand series counts the same requests again: left out
        score("orders-demand-eu", 20, 15.0, capacity=1000.0),
        score("orders-demand-eu", 101, 21.0, capacity=1000.0),
        score(E1, 60, 12.0), score(E2, 60, 6.0),  # 18
        score(E1, 100, 12.0),  # still 18
        score(E2, 101, 9.0),  # 21 > 20: the crossing
        score(E1, 130, 5.0), score(E2, 130, 5.0),  # 10
        # c2: 19 at 320; E2's 15 rps expires at 330 (no later E2 score before 560), so at
        # 340 demand is 8 of 10 (E1 alone), not 23 of 20.
        score(E1, 300, 4.0), score(E2, 320, 15.0, valid_s=10), score(E1, 340, 8.0),
        # c3: the mirror's requests count as demand, its capacity does not.
        score(E1, 560, 8.0), score(E2, 560, 8.0), score(MIRROR, 560, 6.0, capacity=100.0),
        score(MIRROR, 600, 10.0, capacity=100.0),  # 26 > 25 (22 at 560 was only > 20)
        # c4: 11 at 690, 32 from 700 on (over 20 = the central endpoints' capacities).
        score(E1, 690, 5.0), score(E2, 690, 5.0), score(MIRROR, 690, 1.0, capacity=100.0),
        score(E1, 700, 15.0), score(E2, 700, 15.0), score(MIRROR, 700, 2.0, capacity=100.0),
        score(E1, 710, 15.0), score(E2, 710, 15.0), score(MIRROR, 710, 2.0, capacity=100.0),
    ])
    got = lead_rows(client)
    assert set(got) == {"c1", "c2", "c3", "c4"}  # c5 never became ready, r1 is a retire
    c1, c2, c3, c4 = (got[k] for k in ("c1", "c2", "c3", "c4"))
    # c1: the sum crossed at 101 (not E1's own crossing at 20): ready 61 s before.
    assert offset_s(c1["crossed_at"]) == 101.0 and c1["lead_seconds"] == 61.0
    assert (c1["demand_rps"], c1["capacity_rps"]) == (21.0, 20.0)
    assert c1["note"] == "mirror ready before demand crossed capacity"
    # c2: no crossing before c3 was issued (the one at 600 is c3's): NULL, and why.
    assert c2["crossed_at"] is None and c2["lead_seconds"] is None
    assert c2["demand_rps"] is None and "did not cross" in c2["note"]
    # c3: the command's 25 rps, not the summed 20 (which 22 rps at 560 exceeded).
    assert offset_s(c3["crossed_at"]) == 600.0 and c3["lead_seconds"] == 95.0
    assert (c3["demand_rps"], c3["capacity_rps"]) == (26.0, 25.0)
    # c4: the over-capacity run it came into began at 700: ready 30 s late.
    assert offset_s(c4["crossed_at"]) == 700.0 and c4["lead_seconds"] == -30.0
    assert (c4["demand_rps"], c4["capacity_rps"]) == (32.0, 20.0)
    assert c4["note"] == "mirror ready after demand crossed capacity"
    # A look-back too short to see where c4's run began: no number, a note instead.
    got = lead_rows(client, lookback_s=10)
    assert got["c4"]["crossed_at"] is None and got["c4"]["lead_seconds"] is None
    assert "already over capacity" in got["c4"]["note"]
    assert got["c1"]["lead_seconds"] == 61.0 and got["c3"]["lead_seconds"] == 95.0


def test_routing_shares_and_stale_periods(client: Any) -> None:
    def window(ep: str, n: int) -> dict[str, Any]:
        return {"endpoint_id": ep, "region": "eu", "api": "orders", "agent_id": "a",
                "window_start": T, "window_end": T + 60_000, "interval_ms": 60_000,
                "request_count": n, "errors_4xx": 0, "errors_5xx": 0, "errors_connect": 0,
                "latency_p50_ms": 1.0, "latency_p95_ms": 2.0, "latency_p99_ms": 3.0,
                "latency_max_ms": 4.0, "cpu_percent": 1.0, "memory_percent": 1.0,
                "net_in_bytes": 0, "net_out_bytes": 0}

    # the region's demand series counts e1's and e2's requests again: not a share
    insert(client, "telemetry", [window("e1", 30), window("e2", 90),
                                 window("orders-demand-eu", 120)])
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
    assert set(got) == {"e1", "e2"}
    assert got["e1"]["share"] == 0.25 and got["e2"]["share"] == 0.75
    assert got["e1"]["routed_share"] == 0.25 and got["e2"]["routed_share"] == 0.75
    assert got["e1"]["mean_weight"] == pytest.approx(0.3)
    assert got["e2"]["stale_fraction"] == pytest.approx(2 / 6, abs=1e-6)
    # --sql binds parameters; it cannot write.
    n = run_sql(client, "SELECT count() AS n FROM telemetry WHERE request_count > {k:UInt32}",
                {"k": 50})
    assert n.rows == [[2]]  # e2 and the demand series
    with pytest.raises(QueryError, match=r"got DROP"):
        run_sql(client, "DROP TABLE telemetry")
    assert client.query("SELECT count() FROM telemetry").result_rows == [(3,)]
