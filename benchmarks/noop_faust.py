"""A no-op Faust agent on the telemetry topic: the baseline for benchmarks/processor.py.

Same Faust settings as the loadcast worker; it only counts events
(``loadcast_noop_events_total`` on ``--metrics-port``).

    python benchmarks/noop_faust.py --bootstrap 127.0.0.1:9092 --metrics-port 9300
"""

from __future__ import annotations

import argparse
from typing import Any

import faust
from prometheus_client import Counter, Gauge, start_http_server

from streams.kafka.faust_config import faust_settings
from streams.kafka.settings import KafkaSettings

EVENTS = Counter("loadcast_noop_events_total", "Events the no-op agent iterated over")
ASSIGNED = Gauge("loadcast_noop_partitions", "Partitions assigned")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--prefix", default="loadcast.")
    ap.add_argument("--app-id", default="loadcast-noop")
    ap.add_argument("--metrics-port", type=int, required=True)
    a = ap.parse_args(argv)
    kafka = KafkaSettings(bootstrap_servers=a.bootstrap, topic_prefix=a.prefix)
    app = faust.App(a.app_id, **faust_settings(kafka))
    topic = app.topic(f"{a.prefix}telemetry", key_type=bytes, value_type=bytes,
                      key_serializer="raw", value_serializer="raw")

    @app.agent(topic, name="noop")
    async def noop(stream: Any) -> None:
        async for _event in stream.events():
            EVENTS.inc()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def assigned(sender: Any, *args: Any, **kw: Any) -> None:
        ASSIGNED.set(len(args[0] if args else kw["assigned"]))

    start_http_server(a.metrics_port, addr="127.0.0.1")
    import uvloop

    faust.Worker(app, loglevel="warn", quiet=True, loop=uvloop.new_event_loop()
                 ).execute_from_commandline()


if __name__ == "__main__":
    main()
