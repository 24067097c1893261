"""Forecasting worker throughput and latency, next to a no-op Faust agent, in one run.

Phases, each worker a separate process whose CPU time and resident memory are read with
psutil; the throughput phases share one embedded broker (Tansu, own topics each), every
latency phase gets a fresh one:

1. ``batch``: the loadcast worker on TelemetryBatch values (one per partition per
   monitoring interval); endpoint-windows/s (wall and per CPU-second), resident memory per
   endpoint model;
2. ``single``: the loadcast worker on single EndpointTelemetry values;
3. ``noop``: a no-op Faust agent (benchmarks/noop_faust.py) on the same single values: the
   ceiling Faust itself sets;
4. ``latency`` / ``latency_batch``: background single records (or TelemetryBatch values)
   at half the measured maximum rate, plus 20 probe windows a second from fresh endpoints
   (an endpoint's first window is always published); probe produced → its score received
   by a consumer, p50/p99;
5. ``latency_broker`` / ``latency_batch_broker``: the same load with no worker; a plain
   confluent-kafka consumer of the telemetry topic times probe produced → probe received,
   what the broker alone costs at that load.

Windows are 5 s, the model step 60 s (the forecaster learns once per 12 windows and every
window is scored), endpoints' request counts follow the real ELB trace.

    python benchmarks/processor.py            # full run (a few minutes)
    python benchmarks/processor.py --quick    # small, for the test
    python benchmarks/processor.py --batch-only   # phase 1 alone, printed as JSON

The worker reads its settings from the environment as ``loadcast worker`` does, e.g.
``LOADCAST_PROCESSOR__GLOBAL_TREES=false`` to time it without the global trees.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from schemas.codec import Codec
from streams.edge.replay import data_dir, read_trace
from streams.kafka.broker import EmbeddedBroker, free_port
from streams.kafka.partitioning import partition_for
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import ensure_topics, topic_name

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "benchmarks" / "processor.json"
ELB = data_dir() / "elb_request_count_8c0756.csv"
PARTITIONS = 6
INTERVAL_MS = 5000
RUN = {"snapshot_every": 30.0}  # the worker's default; --snapshot-every changes it


def windows(endpoints: int, per_endpoint: int, start: int = 0) -> list[list[dict[str, Any]]]:
    """``per_endpoint`` intervals; each a list of one window per endpoint."""
    values = [v for _, v in read_trace(ELB).rows] if ELB.exists() else [60.0] * 4032
    out = []
    for i in range(start, start + per_endpoint):
        interval = []
        for k in range(endpoints):
            n = round(values[(i + 31 * k) % len(values)] / 12)  # 5-min counts -> 5-s windows
            ws = 1_700_000_000_000 + i * INTERVAL_MS
            interval.append({
                "endpoint_id": f"ep-{k:04d}", "region": "eu", "api": "orders", "agent_id": "b",
                "window_start": ws, "window_end": ws + INTERVAL_MS, "interval_ms": INTERVAL_MS,
                "request_count": n, "errors_4xx": 0, "errors_5xx": 0, "errors_connect": 0,
                "latency_p50_ms": 20.0 + n, "latency_p95_ms": 40.0 + n,
                "latency_p99_ms": 60.0 + 2 * n, "latency_max_ms": 90.0 + 2 * n,
                "cpu_percent": 30.0, "memory_percent": 50.0, "net_in_bytes": 1000 * n,
                "net_out_bytes": 3000 * n,
            })
        out.append(interval)
    return out


def encode(codec: Codec, intervals: list[list[dict[str, Any]]], batch: bool
           ) -> list[tuple[bytes, bytes, int | None]]:
    """(key, value, partition) records, singles or one batch per partition per interval."""
    out: list[tuple[bytes, bytes, int | None]] = []
    for interval in intervals:
        if not batch:
            out += [(w["endpoint_id"].encode(), codec.encode("EndpointTelemetry", w), None)
                    for w in interval]
            continue
        groups: dict[int, list[dict[str, Any]]] = {}
        for w in interval:
            groups.setdefault(partition_for(w["endpoint_id"].encode(), PARTITIONS), []).append(w)
        for p, ws in groups.items():
            value = codec.encode("TelemetryBatch", {"agent_id": "b", "region": "eu",
                                                    "created_at": 0, "windows": ws})
            out.append((ws[0]["endpoint_id"].encode(), value, p))
    return out


def produce(kafka: KafkaSettings, records: list[tuple[bytes, bytes, int | None]]) -> None:
    p = Producer({**kafka.client_config(), "linger.ms": 5, "partitioner": "murmur2_random",
                  "queue.buffering.max.messages": 2_000_000})
    topic = topic_name(kafka, "telemetry")
    for key, value, part in records:
        kw: dict[str, Any] = {} if part is None else {"partition": part}
        while True:
            try:
                p.produce(topic, value, key, **kw)
                break
            except BufferError:
                p.poll(0.01)
        p.poll(0)
    assert p.flush(60) == 0


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


class Proc:
    """A worker (or no-op agent) process with its metrics port."""

    def __init__(self, kafka: KafkaSettings, noop: bool, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.port = free_port()
        app_id = f"bench-{uuid.uuid4().hex[:6]}"
        if noop:
            cmd = [sys.executable, str(REPO / "benchmarks" / "noop_faust.py"), "--bootstrap",
                   kafka.bootstrap_servers, "--prefix", kafka.topic_prefix, "--app-id", app_id,
                   "--metrics-port", str(self.port)]
            self.ready_metric, self.count_metric = "loadcast_noop_partitions", \
                "loadcast_noop_events_total"
        else:
            cmd = [sys.executable, "-m", "loadcast", "worker", "--metrics-port", str(self.port)]
            self.ready_metric, self.count_metric = "loadcast_processor_partitions", \
                "loadcast_processor_windows_total"
        full_env = {**os.environ, "LOADCAST_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                    "LOADCAST_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
                    "LOADCAST_PROCESSOR__APP_ID": app_id,
                    "LOADCAST_PROCESSOR__STEP_SECONDS": "60",
                    "LOADCAST_PROCESSOR__SNAPSHOT_EVERY_SECONDS": str(RUN["snapshot_every"]),
                    **(env or {})}
        self.log = (log or Path(os.devnull)).open("ab")
        self.p = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.p.pid)

    def value(self, name: str) -> float:
        try:
            return metrics(self.port).get(name, 0.0)
        except OSError:
            return 0.0

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError("benchmark process exited")
            if self.value(self.ready_metric) >= PARTITIONS:
                return
            time.sleep(0.2)
        raise TimeoutError("worker never got its partitions")

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self.log.close()


def throughput(broker: EmbeddedBroker, codec: Codec, kind: str, endpoints: int,
               per_endpoint: int) -> dict[str, Any]:
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, partitions=PARTITIONS,
                          topic_prefix=f"b{uuid.uuid4().hex[:6]}.")
    ensure_topics(kafka)
    records = encode(codec, windows(endpoints, per_endpoint), batch=kind == "batch")
    total = endpoints * per_endpoint
    expected = len(records) if kind == "noop" else total
    proc = Proc(kafka, noop=kind == "noop")
    try:
        proc.wait_ready()
        rss0 = proc.ps.memory_info().rss
        started = (time.monotonic(), proc.cpu(), 0.0)
        produce(kafka, records)
        first = None
        deadline = time.monotonic() + 600
        count = 0.0
        while time.monotonic() < deadline:
            count = proc.value(proc.count_metric)
            now, cpu = time.monotonic(), proc.cpu()
            if first is None and count > 0:
                first = (now, cpu, count)
            if count >= expected:
                break
            time.sleep(0.05)
        assert first is not None and count >= expected, f"{kind}: only {count}/{expected}"
        if now - first[0] < 0.5:
            first = started  # all of it between two samples: time it from the first record
        wall = now - first[0]
        cpu_s = cpu - first[1]
        done = count - first[2]
        windows_done = done * (total / expected)  # noop counts records; batch = many windows
        rss = proc.ps.memory_info().rss
        scores = proc.value("loadcast_processor_scores_published_total")
        trees = proc.value("loadcast_processor_global_trees_version")
    finally:
        proc.stop()
    return {"kind": kind, "windows": total, "records": len(records),
            "windows_per_s": round(windows_done / wall) if wall > 0 else None,
            "windows_per_cpu_s": round(windows_done / cpu_s) if cpu_s > 0 else None,
            "records_per_s": round(done / wall) if wall > 0 else None,
            "scores_published": int(scores), "endpoints": endpoints,
            "global_trees_version": int(trees),
            "rss_per_endpoint_kb": round((rss - rss0) / endpoints / 1024, 1)}


def latency(broker: EmbeddedBroker, codec: Codec, rate: float, seconds: float,
            endpoints: int, probes_per_s: float = 20.0, batch: bool = False,
            worker: bool = True) -> dict[str, Any]:
    """Background windows at ``rate`` (single values, or TelemetryBatch values as agents
    send them) plus probe windows of fresh endpoints (a first window is always published),
    in the default configuration; probe -> score latency.

    ``worker=False`` is the baseline: no worker; a plain confluent-kafka consumer of the
    telemetry topic (fetch wait 20 ms, like the worker's) times probe -> probe received,
    which is what the broker alone costs at that load. ``main`` runs each on a fresh broker."""
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, partitions=PARTITIONS,
                          topic_prefix=f"l{uuid.uuid4().hex[:6]}.")
    ensure_topics(kafka)
    per_endpoint = max(2, int(rate * seconds / endpoints))
    background = encode(codec, windows(endpoints, per_endpoint), batch=batch)
    per_record = endpoints * per_endpoint / len(background)  # windows in each value
    record_rate = rate / per_record
    probe = windows(1, 1)[0][0]
    sent: dict[bytes, float] = {}
    got: list[float] = []
    stop = threading.Event()
    proc = Proc(kafka, noop=False) if worker else None
    c = Consumer(kafka.consumer_config(None, **{"fetch.wait.max.ms": 5 if worker else 20}))
    read = topic_name(kafka, "load-scores" if worker else "telemetry")
    c.assign([TopicPartition(read, p, 0) for p in range(PARTITIONS)])

    def collect() -> None:
        while not stop.is_set():
            for m in c.consume(1000, 0.05):
                k = m.key()
                if not m.error() and k in sent:
                    got.append(time.time() - sent.pop(k))

    try:
        if proc is not None:
            proc.wait_ready()
        reader = threading.Thread(target=collect)
        reader.start()
        p = Producer({**kafka.client_config(), "linger.ms": 1, "partitioner": "murmur2_random"})
        topic = topic_name(kafka, "telemetry")
        every = max(1, round(record_rate / probes_per_s))
        t0 = time.monotonic()
        cpu0 = proc.cpu() if proc is not None else 0.0
        for i, (key, value, part) in enumerate(background):
            delay = t0 + i / record_rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if part is None:
                p.produce(topic, value, key)
            else:
                p.produce(topic, value, key, partition=part)
            if i % every == 0:
                name = f"probe-{i}"
                pk = name.encode()
                sent[pk] = time.time()
                p.produce(topic, codec.encode("EndpointTelemetry", dict(probe, endpoint_id=name)),
                          pk)
            p.poll(0)
        p.flush(30)
        # Worker cores in use.
        busy = (proc.cpu() - cpu0) / (time.monotonic() - t0) if proc is not None else 0.0
        deadline = time.monotonic() + 30
        while sent and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        reader.join(10)
    finally:
        c.close()
        if proc is not None:
            proc.stop()
    lat = sorted(got[len(got) // 10:])  # drop the first tenth: warm-up
    if len(lat) < 2:
        return {"rate": round(rate), "probes": len(got), "lost": len(sent)}
    q = statistics.quantiles(lat, n=100)
    return {"rate": round(rate), "batch": batch, "probes": len(got), "lost": len(sent),
            "worker_cpu": round(busy, 2),
            "p50_ms": round(statistics.median(lat) * 1000, 1), "p99_ms": round(q[98] * 1000, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run for the test")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--latency-rate", type=float, default=None,
                    help="only the latency phase, at this many windows/s")
    ap.add_argument("--latency-batch", action="store_true",
                    help="with --latency-rate: background as TelemetryBatch values")
    ap.add_argument("--snapshot-every", type=float, default=RUN["snapshot_every"],
                    help="worker snapshot interval, seconds (default: the worker's 30)")
    ap.add_argument("--batch-only", action="store_true",
                    help="only the TelemetryBatch throughput phase (printed, not written)")
    a = ap.parse_args(argv)
    if a.snapshot_every <= 0:
        ap.error("--snapshot-every must be > 0")
    RUN["snapshot_every"] = a.snapshot_every
    endpoints, per_endpoint = (50, 40) if a.quick else (300, 200)
    codec = Codec.embedded()
    result: dict[str, Any] = {"quick": a.quick, "interval_s": INTERVAL_MS / 1000,
                              "step_s": 60, "snapshot_every_s": a.snapshot_every, "phases": {}}
    if a.latency_rate:
        seconds = 3 if a.quick else 2 * RUN["snapshot_every"]
        out = {}
        for name, worker in (("worker", True), ("broker_alone", False)):
            with EmbeddedBroker() as broker:
                out[name] = latency(broker, codec, a.latency_rate, seconds, endpoints,
                                    batch=a.latency_batch, worker=worker)
        print(json.dumps(out))
        return 0
    if a.batch_only:
        with EmbeddedBroker() as broker:
            print(json.dumps(throughput(broker, codec, "batch", endpoints, per_endpoint)))
        return 0
    with EmbeddedBroker() as broker:
        for kind in ("batch", "single", "noop"):
            result["phases"][kind] = throughput(broker, codec, kind, endpoints, per_endpoint)
    single = result["phases"]["single"]["windows_per_s"] or 100
    batched = result["phases"]["batch"]["windows_per_s"] or 100
    seconds = 3 if a.quick else 2 * RUN["snapshot_every"]  # always spans snapshot rounds
    for key, rate, batch in (("latency", single / 2, False), ("latency_batch", batched / 2, True)):
        for suffix, worker in (("", True), ("_broker", False)):
            # A fresh broker each: Tansu's memory storage keeps every earlier phase's records
            # (hundreds of thousands of small batches after a single-record phase), and its
            # fetches slow down with what it holds.
            with EmbeddedBroker() as broker:
                result["phases"][key + suffix] = latency(
                    broker, codec, rate=rate, seconds=seconds, endpoints=endpoints, batch=batch,
                    worker=worker)
    ph = result["phases"]
    noop = ph["noop"]["records_per_s"] or 1
    result["single_vs_noop"] = round((ph["single"]["windows_per_s"] or 0) / noop, 3)
    show(result)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {a.out}")
    return 0


def show(r: dict[str, Any]) -> None:
    ph = r["phases"]
    t = Table(title=f"forecasting worker, {ph['batch']['endpoints']} endpoints, "
                    f"{r['interval_s']:.0f}-s windows, {r['step_s']}-s model step")
    for col in ("phase", "windows/s", "windows/CPU-s", "records/s", "scores", "KB/endpoint",
                "× no-op"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    noop = ph["noop"]["records_per_s"] or 1
    for kind, label in (("batch", "worker, TelemetryBatch"), ("single", "worker, single"),
                        ("noop", "no-op Faust agent, single")):
        p = ph[kind]
        t.add_row(label, f"{p['windows_per_s'] or 0:,}", f"{p['windows_per_cpu_s'] or 0:,}",
                  f"{p['records_per_s'] or 0:,}", f"{p['scores_published']:,}" if kind != "noop"
                  else "-", f"{p['rss_per_endpoint_kb']}" if kind != "noop" else "-",
                  f"{(p['records_per_s'] or 0) / noop:.2f}")
    console = Console(width=120)  # wide enough for the tables when piped
    console.print(t)
    lt = Table(title="window -> score published, at half the measured maximum rate")
    for col in ("background", "windows/s", "worker cores", "p50 ms", "p99 ms", "probes",
                "lost", "broker alone p50", "broker alone p99"):
        lt.add_column(col, justify="left" if col == "background" else "right")
    for key, label in (("latency", "single values"), ("latency_batch", "TelemetryBatch")):
        lat, base = ph[key], ph.get(f"{key}_broker", {})
        lt.add_row(label, f"{lat.get('rate')}", f"{lat.get('worker_cpu')}",
                   f"{lat.get('p50_ms')}", f"{lat.get('p99_ms')}", f"{lat.get('probes')}",
                   f"{lat.get('lost')}", f"{base.get('p50_ms')}", f"{base.get('p99_ms')}")
    console.print(lt)
    console.print("broker alone: the same load with no worker; a plain consumer of the "
                  "telemetry topic times probe -> probe received.")


if __name__ == "__main__":
    raise SystemExit(main())
