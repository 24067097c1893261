"""The edge agent's aggregation, privacy and input checks (no Kafka needed here)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from schemas.codec import Codec
from streams.edge.agent import TelemetryAggregator, TelemetryInputError
from streams.edge.replay import LatencyModel, read_trace, replay, split_evenly, window_counts
from tests.conftest import ELB


def agg(**kw: Any) -> TelemetryAggregator:
    return TelemetryAggregator("a1", "eu-west", interval_seconds=5, **kw)


def test_windows_count_errors_and_quantiles(codec: Codec) -> None:
    a = agg()
    for i in range(100):
        a.record("e1", float(i + 1), 200, at=1000.0 + i * 0.01)
    a.record("e1", 5.0, 404, at=1001.0)
    a.record("e1", 5.0, 503, at=1001.0)
    a.record("e1", 0.0, 0, at=1001.0, connect_failure=True)
    a.record("e1", 7.0, 200, at=1006.0)  # next window
    (w,) = a.close_due(1005.0)
    assert (w["request_count"], w["errors_4xx"], w["errors_5xx"], w["errors_connect"]) == (
        103, 1, 1, 1)
    assert w["window_start"] == 1_000_000 and w["window_end"] == 1_005_000
    # DDSketch: 1 % relative accuracy on p50/p99 of 1..100 (plus two 5 ms requests)
    assert w["latency_p50_ms"] == pytest.approx(49, rel=0.03)
    assert w["latency_p99_ms"] == pytest.approx(99, rel=0.03)
    assert w["latency_max_ms"] == 100.0
    codec.encode("EndpointTelemetry", w)  # what the agent emits is valid
    (w2,) = a.close_due(1010.0)
    assert w2["request_count"] == 1 and w2["window_start"] == 1_005_000


def test_quiet_endpoint_gets_zero_windows_then_goes_idle() -> None:
    a = agg(idle_windows=3)
    a.record("e1", 10.0, 200, at=1000.0)
    out = a.close_due(1100.0)
    assert [w["request_count"] for w in out] == [1, 0, 0, 0]
    assert a.close_due(1200.0) == []


def test_per_endpoint_interval() -> None:
    a = agg(endpoint_intervals={"slow": 60})
    a.record("slow", 10.0, 200, at=1000.0)
    a.record("fast", 10.0, 200, at=1000.0)
    got = {w["endpoint_id"]: w["interval_ms"] for w in a.close_due(1100.0) if w["request_count"]}
    assert got == {"slow": 60_000, "fast": 5_000}


def test_clients_are_hashed_and_suppressed_under_k() -> None:
    a = agg(k_anonymity=5, client_hash_key=b"secret")
    for c in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        a.record("e1", 10.0, 200, at=1000.0, client=c)
    for n in range(6):
        a.record("e2", 10.0, 200, at=1000.0, client=f"192.168.1.{n}")
    out = {w["endpoint_id"]: w for w in a.close_due(1005.0)}
    assert out["e1"]["distinct_clients"] is None  # 3 < k: suppressed
    assert out["e2"]["distinct_clients"] == 6
    assert "10.0.0.1" not in repr(out) and "192.168" not in repr(out)


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("", 10.0, 200), {}, "endpoint_id"),
        ((None, 10.0, 200), {}, "endpoint_id"),
        (("e", math.nan, 200), {}, "latency_ms"),
        (("e", -1.0, 200), {}, "latency_ms"),
        (("e", "fast", 200), {}, "latency_ms"),
        (("e", 10.0, 700), {}, "status"),
        (("e", 10.0, "200"), {}, "status"),
        (("e", 10.0, 200), {"at": math.inf}, "at"),
        (("e", 10.0, 200), {"api": ""}, "api"),
    ],
)
def test_bad_input_is_a_typed_error_and_changes_nothing(
    args: tuple[Any, ...], kwargs: dict[str, Any], field: str
) -> None:
    a = agg()
    a.record("e", 10.0, 200, at=1000.0)
    with pytest.raises(TelemetryInputError) as e:
        a.record(*args, **kwargs)
    assert e.value.field == field
    a.record("e", 20.0, 200, at=1001.0)  # the agent goes on
    (w,) = a.close_due(1005.0)
    assert w["request_count"] == 2


def test_endpoint_bound() -> None:
    a = agg(max_endpoints=2)
    a.record("e1", 1.0, 200, at=1000.0)
    a.record("e2", 1.0, 200, at=1000.0)
    with pytest.raises(TelemetryInputError, match="2 endpoints"):
        a.record("e3", 1.0, 200, at=1000.0)


def test_split_evenly_sums() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert sum(split_evenly(7, 7)) == 7 and split_evenly(0, 2) == [0, 0]


def test_replay_window_sums_equal_the_trace() -> None:
    trace = read_trace(ELB, limit=200)
    a = TelemetryAggregator("a1", "r", interval_seconds=trace.step_seconds,
                            window_offset_seconds=trace.rows[0][0] % trace.step_seconds)
    closed: list[dict[str, Any]] = []
    total = replay(trace, a.record, lambda t: closed.extend(a.close_due(t)),
                   ["e1", "e2", "e3"], latency=LatencyModel(seed=1))
    want = {round(ts * 1000): round(v) for ts, v in trace.rows}
    got = window_counts(closed)
    # Where the trace skips a step, the agent reports a quiet window (0), not nothing.
    assert {t: n for t, n in got.items() if t in want} == want
    assert all(n == 0 for t, n in got.items() if t not in want)
    assert total == sum(want.values())


def test_replay_with_finer_interval_spreads_each_row() -> None:
    trace = read_trace(ELB, limit=20)
    # 5 windows per 5-min row
    a = TelemetryAggregator("a1", "r", interval_seconds=60,
                            window_offset_seconds=trace.rows[0][0] % 60)
    closed: list[dict[str, Any]] = []
    replay(trace, a.record, lambda t: closed.extend(a.close_due(t)), ["e1"])
    counts = window_counts(closed)
    assert len(counts) == 5 * 20
    for ts, v in trace.rows:
        assert sum(counts[round(ts * 1000) + k * 60_000] for k in range(5)) == round(v)


def test_record_many_alike_requests_at_once() -> None:
    a = agg()
    a.record("e1", 20.0, 200, at=1000.0, count=500)
    a.record("e1", 900.0, 503, at=1001.0, count=10)
    a.record("e1", 0.0, 0, at=1001.0, connect_failure=True, count=3)
    (w,) = a.close_due(1005.0)
    assert (w["request_count"], w["errors_5xx"], w["errors_connect"]) == (513, 10, 3)
    assert w["latency_p50_ms"] == pytest.approx(20, rel=0.02)
    assert w["latency_p99_ms"] == pytest.approx(900, rel=0.02)
    with pytest.raises(TelemetryInputError) as e:
        a.record("e1", 1.0, 200, count=-1)
    assert e.value.field == "count"
