"""``loadcast demo``: what exists of the pipeline, on the embedded defaults, live.

Starts the embedded broker, two edge agents (central and edge region) replaying a real
request-rate trace, and a consumer that decodes everything on the telemetry topic; shows
live counts; stops everything (also on Ctrl-C) and prints a summary.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from loadcast.settings import Settings
from schemas.codec import Codec, CodecError
from streams.agent import build_agent, zero_host_stats
from streams.broker import EmbeddedBroker
from streams.replay import read_trace, replay, window_offset
from streams.topics import ensure_topics, topic_name

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = "elb_request_count_8c0756.csv"


def data_dir() -> Path:
    """``$LOADCAST_DATA_DIR``, else ``shared/data`` beside the checkout."""
    return Path(os.environ.get("LOADCAST_DATA_DIR", REPO.parent / "shared" / "data"))


@dataclass
class Tally:
    """What the demo consumer has seen, per region."""

    records: int = 0
    windows: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    p99: dict[str, float] = field(default_factory=dict)
    bad: int = 0


def _consume(settings: Settings, codec: Codec, tally: Tally, stop: threading.Event) -> None:
    c = Consumer(settings.kafka.consumer_config("loadcast-demo"))
    c.subscribe([topic_name(settings.kafka, "telemetry")])
    try:
        while not stop.is_set():
            for msg in c.consume(500, 0.2):
                value = msg.value()
                if msg.error() or value is None:
                    continue
                tally.records += 1
                try:
                    rec = codec.decode(value)
                except CodecError:
                    tally.bad += 1
                    continue
                windows = rec.get("windows", [rec])
                for w in windows:
                    tally.windows += 1
                    r = w["region"]
                    tally.requests[r] = tally.requests.get(r, 0) + w["request_count"]
                    tally.p99[r] = w["latency_p99_ms"]
    finally:
        c.close()


def _view(tally: Tally, elapsed: float, duration: float) -> Table:
    t = Table(title=f"loadcast demo — {elapsed:4.0f}s of {duration:.0f}s")
    t.add_column("region")
    t.add_column("requests seen", justify="right")
    t.add_column("last p99 ms", justify="right")
    for region in sorted(tally.requests):
        t.add_row(region, f"{tally.requests[region]:,}", f"{tally.p99[region]:.1f}")
    t.caption = f"{tally.records:,} Kafka records, {tally.windows:,} endpoint-windows decoded"
    return t


def run_demo(
    settings: Settings, *, duration: float, speedup: float, trace_path: Path | None
) -> Tally:
    """Run the demo for ``duration`` seconds; returns what the consumer saw."""
    path = trace_path or data_dir() / DEFAULT_TRACE
    if not path.is_file():
        raise FileNotFoundError(f"trace {path} not found (set LOADCAST_DATA_DIR or --trace)")
    trace = read_trace(path)
    console = Console()
    codec = Codec.embedded()
    tally = Tally()
    stop = threading.Event()  # the consumer
    stop_replay = threading.Event()
    with EmbeddedBroker() as broker:
        settings.kafka.bootstrap_servers = broker.bootstrap
        settings.kafka.partitions = 4
        ensure_topics(settings.kafka)
        console.print(f"embedded broker at {broker.bootstrap}")
        threads = [threading.Thread(target=_consume, args=(settings, codec, tally, stop))]
        agents = []
        for region, share in (("central", 1.0), ("edge-eu", 0.4)):
            edge = build_agent(
                settings.kafka, codec, agent_id=f"demo-{region}", region=region, batch=True,
                host_stats=zero_host_stats, interval_seconds=trace.step_seconds,
                default_api="orders",
                window_offset_seconds=window_offset(trace, trace.step_seconds),
            )
            agents.append(edge)
            names = [f"orders-{region}-{i}" for i in range(1, 4)]
            threads.append(threading.Thread(
                target=replay,
                args=(trace, edge.record, edge.tick, names),
                kwargs={"api": "orders", "speedup": speedup, "scale": share, "stop": stop_replay},
            ))
        for th in threads:
            th.start()
        start = time.monotonic()
        try:
            with Live(_view(tally, 0, duration), console=console, refresh_per_second=4) as live:
                while time.monotonic() - start < duration and any(
                    th.is_alive() for th in threads[1:]
                ):
                    time.sleep(0.25)
                    live.update(_view(tally, time.monotonic() - start, duration))
        except KeyboardInterrupt:
            console.print("interrupted: stopping")
        finally:
            stop_replay.set()
            for th in threads[1:]:
                th.join(30)
            for edge in agents:
                edge.close(10)
            time.sleep(1.0)  # let the consumer read the last windows
            stop.set()
            threads[0].join(30)
            threads.clear()  # they hold the agents' bound methods
            agents.clear()
            gc.collect()  # destroy the producers before their broker goes away
    console.print(_view(tally, time.monotonic() - start, duration))
    console.print("demo finished cleanly: broker stopped, agents flushed")
    return tally
