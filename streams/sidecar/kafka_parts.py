"""The sidecar's Kafka parts: the edge agent (telemetry, a thread of its own), the producer
of routing decisions (and of dead letters), and the score subscriber (a thread of its own,
restarted if it dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from processors.mirroring import demand_series_id
from schemas.codec import Codec
from streams.edge.agent import EdgeAgent, TelemetryInputError, build_agent
from streams.kafka.producer import RecordProducer
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from streams.sidecar.config import SidecarSettings, Upstream
from streams.sidecar.scores import Batch, ScoreSubscriber

log = logging.getLogger(__name__)

SUPERVISE_S = 1.0


class SidecarKafka:
    """Telemetry out, decisions out, scores in, for sidecar ``sidecar_id``."""

    def __init__(self, kafka: KafkaSettings, codec: Codec, sidecar_id: str,
                 settings: SidecarSettings, upstreams: list[Upstream]) -> None:
        self.kafka = kafka
        self.codec = codec
        self.id = sidecar_id
        self.settings = settings
        self.upstreams = upstreams
        self.decisions_topic = topic_name(kafka, "routing-decisions")
        self.producer: RecordProducer | None = None
        self.agent: EdgeAgent | None = None
        self.subscriber: ScoreSubscriber | None = None
        self._agent_stop = threading.Event()
        self._agent_thread: threading.Thread | None = None
        self._supervisor: asyncio.Task[None] | None = None

    def start_agent(self) -> EdgeAgent:
        """The producer and the edge agent, its flush loop in a thread."""
        s = self.settings
        self.producer = RecordProducer(self.kafka, f"sidecar-{self.id}", max_buffered=50_000)
        self.agent = build_agent(
            self.kafka, self.codec, agent_id=self.id, region=s.region,
            interval_seconds=s.telemetry_interval_s,
            endpoint_apis={u.id: u.api for u in self.upstreams},
        )
        self._agent_thread = threading.Thread(
            target=self.agent.run, args=(self._agent_stop,), name="sidecar-agent", daemon=True,
        )
        self._agent_thread.start()
        return self.agent

    async def start_subscriber(self, deliver: Callable[[Batch], None],
                               mirror_statuses: bool) -> None:
        """Read scores (and mirror statuses when ``mirror_statuses``) into ``deliver``."""
        s = self.settings
        self.subscriber = ScoreSubscriber(
            self.kafka, self.codec, deliver, sidecar_id=self.id,
            dead_letter=self.producer, lookback_s=s.score_lookback_s,
            mirror_status_lookback_s=s.mirror_lookback_s if mirror_statuses else None,
        )
        await asyncio.to_thread(self.subscriber.start)
        self._supervisor = asyncio.create_task(self._supervise_loop(), name="sidecar-supervise")

    async def _supervise_loop(self) -> None:
        """Restart the score reader thread if it died (``/health`` is 503 meanwhile)."""
        while True:
            await asyncio.sleep(SUPERVISE_S)
            sub = self.subscriber
            if sub is not None:
                sub.supervise()

    def count_arrival(self, api: str, region: str) -> None:
        """One request of ``region`` for ``api`` that needs an origin, counted on the
        region's demand series (:func:`processors.mirroring.demand_series_id`) whichever
        endpoint or mirror serves it; only the sidecar's own region (the agent's windows
        carry the agent's region). The series counts arrivals: latency 0, status 200."""
        if self.agent is not None and region == self.settings.region:
            try:
                self.agent.record(demand_series_id(api, region), 0.0, 200, api=api)
            except TelemetryInputError as e:  # e.g. an id over the length limit
                log.debug("demand telemetry rejected: %s", e)

    def publish(self, rec: dict[str, Any]) -> None:
        """One RoutingDecision (dropped with an error log if it does not encode)."""
        if self.producer is None:
            return
        try:
            value = self.codec.encode("RoutingDecision", rec)
        except ValueError as e:  # a bug, but routing must go on
            log.error("routing decision did not encode: %s", e)
            return
        self.producer.produce(self.decisions_topic, value, self.id.encode())
        self.producer.poll(0)

    async def stop_subscriber(self) -> None:
        if self.subscriber is not None:
            await asyncio.to_thread(self.subscriber.stop)
            self.subscriber = None
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None

    async def stop(self) -> None:
        """Stop the agent's thread, flush what is open, drop the clients."""
        if self._agent_thread is not None:
            self._agent_stop.set()
            await asyncio.to_thread(self._agent_thread.join, 30)
            self._agent_thread = None
        if self.producer is not None:
            await asyncio.to_thread(self.producer.flush, 10)
        # drop the Kafka clients now rather than at garbage collection
        self.producer = None
        self.agent = None
