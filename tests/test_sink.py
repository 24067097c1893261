"""The ClickHouse sink on the real embedded broker (Tansu) and embedded chDB.

Known input → sink → ``loadcast query`` (through the admin endpoint while the sink runs,
directly after it stops), compared with numbers computed here independently; bad records
end in dead_letter and the stream goes on.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from schemas.codec import Codec, EmbeddedIds
from sinks.service import serve
from sinks.settings import SinkSettings
from sinks.sink import Sink
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from tests.kafka_helpers import read_topic

pytestmark = pytest.mark.slow

STEP = 60
BAD_RECORDS = 5  # undecodable records produce() adds (each becomes one dead letter)
WINDOW_MS = 10_000
MINUTES = 10


def window(ep: str, start: int, i: int, n: int) -> dict[str, Any]:
    return {
        "endpoint_id": ep, "region": "eu", "api": "orders", "agent_id": "a1",
        "window_start": start, "window_end": start + WINDOW_MS, "interval_ms": WINDOW_MS,
        "request_count": n, "errors_4xx": i % 2, "errors_5xx": int(i % 3 == 0),
        "errors_connect": 0, "latency_p50_ms": 5.0 + i % 5, "latency_p95_ms": 20.0 + i % 7,
        "latency_p99_ms": 40.0 + (i * 3) % 11, "latency_max_ms": 90.0 + i,
        "cpu_percent": 10.0, "memory_percent": 20.0, "net_in_bytes": 100, "net_out_bytes": 200,
    }


def known_input(base: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Windows of two endpoints over MINUTES minutes, and scores with 3-step forecasts."""
    windows = []
    for i in range(MINUTES * 6):
        start = base + i * WINDOW_MS
        windows.append(window("e1", start, i, 10 + (i % 7) * 3))
        windows.append(window("e2", start, i, 50 + (i * 13) % 11))
    scores = []
    # (level, bias per horizon, band half-width): e1 runs near 1.9 rps, e2 near 5.5 rps.
    for ep, level, bias, half in (("e1", 1.6, 0.15, 0.3), ("e2", 5.9, -0.2, 0.5)):
        for k in range(MINUTES):
            computed = base + k * STEP * 1000
            forecast = []
            for h in (1, 2, 3):
                mean = level + bias * h + 0.04 * k
                forecast.append({"horizon": h, "at": computed + h * STEP * 1000, "mean": mean,
                                 "lower": mean - half, "upper": mean + half + 0.1 * h})
            scores.append({
                "endpoint_id": ep, "api": "orders", "region": "eu", "computed_at": computed,
                "valid_until": computed + 120_000, "score": 0.5, "capacity_rps": 10.0,
                "current_rps": 1.0, "predicted_utilization": 0.1, "latency_p99_ms": 40.0,
                "error_rate": 0.01, "step_seconds": STEP, "forecast": forecast,
            })
    return windows, scores


def expected_latency(windows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    out: dict[tuple[str, int], dict[str, float]] = {}
    for w in windows:
        key = (w["endpoint_id"], w["window_start"] // 60_000 * 60_000)
        e = out.setdefault(key, {"requests": 0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0})
        n = w["request_count"]
        e["requests"] += n
        e["p50"] += w["latency_p50_ms"] * n
        e["p95"] += w["latency_p95_ms"] * n
        e["p99"] += w["latency_p99_ms"] * n
        e["max"] = max(e["max"], w["latency_max_ms"])
    for e in out.values():
        for q in ("p50", "p95", "p99"):
            e[q] /= e["requests"]
    return out


def expected_accuracy(windows: list[dict[str, Any]], scores: list[dict[str, Any]]
                      ) -> dict[tuple[str, int], dict[str, float]]:
    """MAE, MASE (naive one-step-back denominator) and coverage, by hand."""
    out = {}
    for ep in ("e1", "e2"):
        ws = [w for w in windows if w["endpoint_id"] == ep]
        last_end = max(w["window_end"] for w in ws)

        def actual(at: int, ws: list[dict[str, Any]] = ws) -> float | None:
            inside = [w["request_count"] for w in ws if at <= w["window_start"] < at + STEP * 1000]
            return sum(inside) / STEP if inside else None

        buckets = sorted({w["window_start"] // (STEP * 1000) * STEP * 1000 for w in ws})
        series = [actual(b) for b in buckets if b + STEP * 1000 <= last_end]
        diffs = [abs(b - a) for a, b in itertools.pairwise(series)
                 if a is not None and b is not None]
        naive = sum(diffs) / len(diffs)
        for h in (1, 2, 3):
            errs, covered = [], []
            for s in scores:
                if s["endpoint_id"] != ep:
                    continue
                p = s["forecast"][h - 1]
                y = actual(p["at"])
                if y is None or p["at"] + STEP * 1000 > last_end:
                    continue
                errs.append(abs(p["mean"] - y))
                covered.append(p["lower"] <= y <= p["upper"])
            mae = sum(errs) / len(errs)
            out[(ep, h)] = {"points": len(errs), "mae": mae, "mase": mae / naive,
                            "coverage": sum(covered) / len(covered)}
    return out


def produce(kafka: KafkaSettings, codec: Codec, windows: list[dict[str, Any]],
            scores: list[dict[str, Any]], bad: bool = True) -> int:
    """e1 windows as single values, e2 windows in TelemetryBatch values of 6; returns the
    number of Kafka records (good and bad)."""
    p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 5})
    tel, sc = topic_name(kafka, "telemetry"), topic_name(kafka, "load-scores")
    n = 0
    if bad:  # before the good ones: the sink must go on past them
        p.produce(tel, b"not avro at all", key=b"e1")
        p.produce(tel, codec.encode("Anomaly", {  # a valid value of the wrong type
            "endpoint_id": "e1", "api": "orders", "region": "eu", "detected_at": 1,
            "window_start": 1, "score": 0.5, "threshold": 0.5}), key=b"e1")
        p.produce(sc, codec.encode("LoadScore", scores[0])[:-3], key=b"e1")  # truncated
        # Current telemetry schemas, which ClickHouse decodes: it must refuse these two,
        # and the sink must still dead-letter exactly them and store the rest once.
        unchecked = Codec(EmbeddedIds(), validate_on_encode=False)
        hot = {**windows[0], "cpu_percent": 250.0}
        p.produce(tel, unchecked.encode("EndpointTelemetry", hot), key=b"e1")  # out of range
        batch = {"agent_id": "a1", "region": "eu", "created_at": 1, "windows": windows[:4]}
        p.produce(tel, codec.encode("TelemetryBatch", batch)[:-40], key=b"e2")  # truncated
        n += BAD_RECORDS
    e2 = [w for w in windows if w["endpoint_id"] == "e2"]
    for w in windows:
        if w["endpoint_id"] == "e1":
            p.produce(tel, codec.encode("EndpointTelemetry", w), key=b"e1")
            n += 1
    for i in range(0, len(e2), 6):
        batch = {"agent_id": "a1", "region": "eu", "created_at": e2[i]["window_start"],
                 "windows": e2[i:i + 6]}
        p.produce(tel, codec.encode("TelemetryBatch", batch), key=b"e2")
        n += 1
    for s in scores:
        p.produce(sc, codec.encode("LoadScore", s), key=s["endpoint_id"].encode())
        n += 1
    assert p.flush(30) == 0
    return n


def cli_env(kafka: KafkaSettings, dsn: str) -> dict[str, str]:
    return {**os.environ, "LOADCAST_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "LOADCAST_KAFKA__TOPIC_PREFIX": kafka.topic_prefix, "LOADCAST_SINK__DSN": dsn}


def cli_query(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    r = subprocess.run([sys.executable, "-m", "loadcast", "query", *args, "-f", "json"],
                       env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    rows: list[dict[str, Any]] = json.loads(r.stdout)
    return rows


@pytest.fixture
def base_ms() -> int:
    # Whole minutes, in the past (so "until now" covers it) and well inside the TTL.
    return (time.time_ns() // 1_000_000) // 60_000 * 60_000 - 40 * 60_000


@pytest.fixture
def running_sink(kafka: KafkaSettings, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An in-process sink (with admin endpoint on a free port) until the test ends."""
    settings = SinkSettings(dsn=f"chdb://{tmp_path}/ch", group_id=f"sink-{kafka.topic_prefix}",
                            batch_max_seconds=0.3, admin_port=0)
    stop = threading.Event()
    state: dict[str, Any] = {"settings": settings, "stop": stop}
    ready = threading.Event()

    def on_ready(sink: Sink, admin: Any) -> None:
        state["sink"], state["admin"] = sink, admin
        ready.set()

    t = threading.Thread(target=lambda: state.update(
        stats=serve(kafka, settings, stop, on_ready=on_ready)), daemon=True)
    t.start()
    assert ready.wait(30)
    state["thread"] = t
    try:
        yield state
    finally:
        stop.set()
        t.join(30)


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_queries_return_known_numbers_while_running_and_after(
    kafka: KafkaSettings, codec: Codec, base_ms: int, running_sink: dict[str, Any]
) -> None:
    refused = REGISTRY.get_sample_value("loadcast_sink_refused_raw_batches_total") or 0.0
    windows, scores = known_input(base_ms)
    n = produce(kafka, codec, windows, scores)
    sink: Sink = running_sink["sink"]
    # n records, plus the dead letters the sink produced and reads back into dead_letter.
    wait_for(lambda: sink.stats.records >= n + BAD_RECORDS, 60, "the sink to store everything")
    env = cli_env(kafka, running_sink["settings"].dsn)

    # While the sink runs it holds the chDB directory: the query goes through its admin
    # endpoint (token from the 0600 file it wrote).
    while_running = cli_query(env, "latency", "--since", "2h")
    accuracy_running = cli_query(env, "forecast-accuracy", "--since", "2h")
    dead_running = cli_query(env, "dead-letter", "--since", "1h")
    running_sink["stop"].set()
    running_sink["thread"].join(30)
    assert not running_sink["thread"].is_alive()
    after = cli_query(env, "latency", "--since", "2h")  # directly on the directory now
    assert after == while_running

    want = expected_latency(windows)
    assert len(while_running) == len(want) == 2 * MINUTES
    for row in while_running:
        minute = round(dt.datetime.fromisoformat(row["minute"]).timestamp() * 1000)
        e = want[(row["endpoint_id"], minute)]
        assert row["requests"] == e["requests"]
        assert row["windows"] == 6
        for q in ("p50", "p95", "p99"):
            assert row[f"{q}_ms"] == pytest.approx(e[q], abs=1e-3)
        assert row["max_ms"] == e["max"]

    acc = expected_accuracy(windows, scores)
    assert len(accuracy_running) == len(acc) == 6
    for row in accuracy_running:
        e = acc[(row["endpoint_id"], row["horizon"])]
        assert row["points"] == e["points"] > 0
        assert row["mae"] == pytest.approx(e["mae"], abs=1e-5)
        assert row["mase"] == pytest.approx(e["mase"], abs=1e-5)
        assert row["coverage"] == pytest.approx(e["coverage"], abs=1e-5)
    # The fixture's numbers are not trivial: coverage differs across the table.
    assert len({round(r["coverage"], 3) for r in accuracy_running}) > 1

    # Bad input: five undecodable records, each in dead_letter with its reason, and on the
    # dead-letter topic with the headers; everything after them was stored.
    reasons = {(r["source_topic"].split(".")[-1], r["reason"]): r["records"]
               for r in dead_running}
    assert reasons == {("telemetry", "bad_magic"): 1, ("telemetry", "wrong_schema"): 1,
                       ("load-scores", "truncated"): 1, ("telemetry", "out_of_range"): 1,
                       ("telemetry", "truncated"): 1}
    dl = read_topic(kafka.bootstrap_servers, topic_name(kafka, "dead-letter"), min_records=5)
    assert len(dl) == 5
    heads = [dict(m.headers() or []) for m in dl]
    got_reasons = [r.decode() if isinstance(r, bytes) else str(r)
                   for r in (h["loadcast.reason"] for h in heads)]
    assert sorted(got_reasons) == [
        "bad_magic", "out_of_range", "truncated", "truncated", "wrong_schema"]
    assert all(h["loadcast.source_topic"] in (topic_name(kafka, "telemetry").encode(),
                                              topic_name(kafka, "load-scores").encode())
               for h in heads)
    assert {m.value() for m in dl} >= {b"not avro at all"}
    # The two bad telemetry values were refused by ClickHouse's decoding (the fast path
    # ran), then decoded here one by one.
    assert (REGISTRY.get_sample_value("loadcast_sink_refused_raw_batches_total") or 0) > refused


def test_query_errors_are_clear(tmp_path: Path, kafka: KafkaSettings) -> None:
    env = cli_env(kafka, f"chdb://{tmp_path}/nothing-here")

    def run(*args: str) -> tuple[int, str]:
        r = subprocess.run([sys.executable, "-m", "loadcast", "query", *args],
                           env=env, capture_output=True, text=True, timeout=60)
        return r.returncode, " ".join(r.stderr.split())  # rich wraps long lines

    code, err = run("latency")
    assert code == 1 and "run `loadcast sink` first" in err
    code, err = run("latency", "--since", "x")
    assert code == 2 and "bad time 'x'" in err
    env["LOADCAST_SINK__DSN"] = "mysql://x"
    code, err = run("latency")
    assert code == 2 and "sink.dsn" in err
