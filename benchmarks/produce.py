"""Telemetry produce throughput: encode + produce against raw produce of pre-encoded bytes.

Side by side in one run on the embedded broker (Tansu, memory storage):

- ``raw``: confluent-kafka ``Producer.produce`` of pre-encoded EndpointTelemetry values
  (the baseline: what the client and broker do without loadcast);
- ``single``: loadcast's publisher encoding each window (validated) and producing it keyed
  by endpoint_id;
- ``batch``: the publisher encoding one TelemetryBatch per partition per flush
  (``--batch-size`` windows per flush), the form the processors prefer.

Rates are endpoint-windows per wall second and per CPU second of this process (librdkafka's
threads included), medians over ``--repeats`` runs.

    python benchmarks/produce.py            # full run
    python benchmarks/produce.py --quick    # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from rich.console import Console
from rich.table import Table

from schemas.codec import Codec
from streams.edge.agent import TelemetryPublisher
from streams.kafka.broker import EmbeddedBroker
from streams.kafka.producer import RecordProducer
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import ensure_topics, topic_name

OUT = Path(__file__).resolve().parents[1] / "out" / "benchmarks" / "produce.json"


def windows(n: int, endpoints: int = 500) -> list[dict[str, Any]]:
    """``n`` realistic endpoint-windows over ``endpoints`` endpoints."""
    out = []
    for i in range(n):
        out.append({
            "endpoint_id": f"orders-{i % endpoints:04d}", "region": "eu-west", "api": "orders",
            "agent_id": "bench", "window_start": 1_700_000_000_000 + (i // endpoints) * 5000,
            "window_end": 1_700_000_005_000 + (i // endpoints) * 5000, "interval_ms": 5000,
            "request_count": 100 + i % 37, "errors_4xx": i % 3, "errors_5xx": i % 2,
            "errors_connect": 0, "latency_p50_ms": 12.5, "latency_p95_ms": 40.0,
            "latency_p99_ms": 80.0 + i % 11, "latency_max_ms": 150.0, "cpu_percent": 35.0,
            "memory_percent": 61.0, "net_in_bytes": 10_000, "net_out_bytes": 30_000,
            "in_flight": 3, "errors_timeout": 0, "distinct_clients": None, "attributes": {},
        })
    return out


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def raw(s: KafkaSettings, topic: str, encoded: list[tuple[bytes, bytes]]) -> None:
    """The baseline: a plain confluent-kafka producer with the same delivery settings."""
    conf = {**s.client_config(), "enable.idempotence": True, "linger.ms": 5,
            "partitioner": "murmur2_random", "queue.buffering.max.messages": 1_000_000}
    p = Producer(conf)
    for value, key in encoded:
        while True:
            try:
                p.produce(topic, value, key)
                break
            except BufferError:
                p.poll(0.001)
        p.poll(0)
    assert p.flush(60) == 0


def publish(s: KafkaSettings, codec: Codec, data: list[dict[str, Any]], batch: bool,
            step: int) -> None:
    """loadcast's publisher, ``step`` windows per publish call (one agent flush)."""
    prod = RecordProducer(s, f"bench-{batch}", max_buffered=1_000_000)
    pub = TelemetryPublisher(s, prod, codec, agent_id="bench", region="eu", batch=batch)
    for i in range(0, len(data), step):
        pub.publish(data[i : i + step])
    assert prod.flush(60) == 0
    assert prod.stats.overflow == 0 and prod.stats.failed == 0


def run(quick: bool, repeats: int, n: int, batch_size: int) -> dict[str, Any]:
    codec = Codec.embedded()
    data = windows(n)
    encoded = [(codec.encode("EndpointTelemetry", w), w["endpoint_id"].encode()) for w in data]
    results: dict[str, list[tuple[float, float]]] = {"raw": [], "single": [], "batch": []}
    with EmbeddedBroker() as broker:
        for rep in range(repeats):
            s = KafkaSettings(bootstrap_servers=broker.bootstrap, partitions=6,
                              topic_prefix=f"bench{rep}{uuid.uuid4().hex[:6]}.")
            ensure_topics(s)
            topic = topic_name(s, "telemetry")
            results["raw"].append(timed(lambda: raw(s, topic, encoded)))  # noqa: B023
            for mode, step in (("single", 1000), ("batch", batch_size)):
                results[mode].append(
                    timed(lambda: publish(s, codec, data, mode == "batch", step))  # noqa: B023
                )
    summary: dict[str, Any] = {"windows_per_run": n, "repeats": repeats, "quick": quick,
                               "batch_size": batch_size, "modes": {}}
    raw_wall = statistics.median(n / w for w, _ in results["raw"])
    for mode, runs in results.items():
        wall = statistics.median(n / w for w, _ in runs)
        cpu = statistics.median(n / c for _, c in runs)
        summary["modes"][mode] = {
            "windows_per_s": round(wall), "windows_per_cpu_s": round(cpu),
            "ratio_vs_raw": round(wall / raw_wall, 3),
            "runs": [{"wall_s": round(w, 4), "cpu_s": round(c, 4)} for w, c in runs],
        }
    return summary


def show(summary: dict[str, Any]) -> None:
    t = Table(title=f"telemetry produce, {summary['windows_per_run']:,} windows × "
                    f"{summary['repeats']} runs (medians)")
    for col in ("mode", "windows/s (wall)", "windows/CPU-s", "× raw"):
        t.add_column(col, justify="right" if col != "mode" else "left")
    labels = {"raw": "raw produce, pre-encoded", "single": "encode+produce, single",
              "batch": f"encode+produce, TelemetryBatch ({summary['batch_size']}/flush)"}
    for mode, m in summary["modes"].items():
        t.add_row(labels[mode], f"{m['windows_per_s']:,}", f"{m['windows_per_cpu_s']:,}",
                  f"{m['ratio_vs_raw']:.2f}")
    Console().print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (seconds) for tests")
    ap.add_argument("--repeats", type=int, default=None, help="runs per mode (default 5)")
    ap.add_argument("--windows", type=int, default=None, help="windows per run (200,000)")
    ap.add_argument("--batch-size", type=int, default=1000, help="windows per publish call")
    ap.add_argument("--out", type=Path, default=OUT, help=f"JSON results (default {OUT})")
    a = ap.parse_args(argv)
    repeats = a.repeats or (1 if a.quick else 5)
    n = a.windows or (5_000 if a.quick else 200_000)
    if repeats < 1 or n < 1:
        ap.error("--repeats and --windows must be >= 1")
    summary = run(a.quick, repeats, n, a.batch_size)
    show(summary)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
