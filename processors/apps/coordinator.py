"""The federated coordinator (``loadcast coordinator``): thin Faust wiring around
:class:`processors.federated.rounds.RoundCoordinator`.

One Faust agent consumes ``model-updates`` (keyed by model family, so one family's
updates are on one partition and one coordinator owns it); a 1 s timer closes rounds whose
deadline passed.  Each closed round is a GlobalModel published to the compacted
``global-model`` topic with a confluent-kafka producer (aiokafka's idempotent producer
fails against Tansu, and exactly-once is not needed: a version is keyed and numbered, a
duplicate is harmless).  At start-up the coordinator reads the repository and continues
from the latest version of every family; updates of a round still open when it stopped are
re-sent by the edges (``resend_after``).  Undecodable or malformed updates go to
``dead-letter`` with the reason in the headers.

Faust settings, and why (same as the processor worker): session timeout 6 s, heartbeat
1 s, rebalance timeout 6 s (Tansu answers JoinGroup after about half the session timeout);
no tables and ``table_standby_replicas=0`` (state is the repository); topics are not
declared by Faust (``streams.kafka.topics.ensure_topics`` creates them); raw values (the
codec decodes); no web server (prometheus-client serves ``metrics_port``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
from prometheus_client import Counter, Gauge

from processors.apps.federated_settings import FederatedSettings
from processors.federated.rounds import RoundCoordinator
from schemas.codec import Codec, CodecError
from schemas.federated import GlobalState, global_to_record, update_from_record
from streams.kafka.registry import codec_for
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings
from streams.metrics import serve_metrics
from streams.model_repo import ModelRepository

log = logging.getLogger(__name__)

UPDATES = Counter("loadcast_coordinator_updates_total",
                  "ModelUpdate records by outcome", ["outcome"])
VERSIONS = Counter("loadcast_coordinator_versions_total", "Global versions published",
                   ["family"])
PARTICIPANTS = Gauge("loadcast_coordinator_round_participants",
                     "Edges in the last closed round", ["family"])


class Coordinator:
    """The coordinator's Kafka side; :meth:`handle` and :meth:`tick` are synchronous and
    usable without Faust."""

    def __init__(self, kafka: KafkaSettings, settings: FederatedSettings,
                 codec: Codec | None = None, *, restore: bool = True) -> None:
        self.kafka = kafka
        self.settings = settings
        self.codec = codec or codec_for(kafka.schema_registry_url)
        self.logic = RoundCoordinator(settings.aggregation_config(),
                                      min_updates=settings.min_updates,
                                      round_timeout=settings.round_timeout_seconds)
        self.runtime = KafkaRuntime(kafka)
        self.producer = self.runtime.record_producer(f"{settings.app_id}-out", linger_ms=1.0)
        self.updates_topic = self.runtime.topic("model-updates")
        self.global_topic = self.runtime.topic("global-model")
        self.dead_topic = self.runtime.topic("dead-letter")
        self.dead_letters = self.runtime.dead_letter(self.producer, client=self.producer.client_id)
        self.published: list[GlobalState] = []
        if restore:
            self.restore()

    def restore(self, timeout: float = 10.0) -> int:
        """Continue from the latest published version of every family."""
        with ModelRepository(self.kafka, self.codec, client_id=f"{self.settings.app_id}-repo"
                             ) as repo:
            repo.refresh(timeout)
            for fam in repo.families():
                state = repo.latest(fam)
                if state is not None:
                    self.logic.restore(state)
            return len(repo.families())

    def handle(self, key: bytes | None, value: bytes | None, partition: int = -1,
               offset: int = -1, now: float | None = None) -> list[GlobalState]:
        """One model-updates record; returns the versions it completed (and published)."""
        now = time.monotonic() if now is None else now
        try:
            if value is None:
                raise CodecError("invalid", "empty value")
            update = update_from_record(self.codec.decode(value, "ModelUpdate"))
        except (CodecError, ValueError, KeyError, TypeError) as e:
            reason = e.reason if isinstance(e, CodecError) else "invalid_update"
            self._dead_letter(key, value or b"", reason, str(e), partition, offset)
            UPDATES.labels("dead_letter").inc()
            return []
        before = len(self.logic.rejected)
        states = self.logic.offer(update, now)
        UPDATES.labels("rejected" if len(self.logic.rejected) > before else "accepted").inc()
        for s in states:
            self.publish(s)
        return states

    def tick(self, now: float | None = None) -> list[GlobalState]:
        """Close rounds whose deadline passed."""
        states = self.logic.due(time.monotonic() if now is None else now)
        for s in states:
            self.publish(s)
        self.producer.poll(0)
        return states

    def publish(self, state: GlobalState) -> None:
        state.created_at = round(time.time() * 1000)
        value = self.codec.encode("GlobalModel", global_to_record(state))
        self.producer.produce(self.global_topic, value, state.family.encode())
        left = self.producer.flush(10.0)
        if left:
            log.error("global version %s v%d not yet delivered", state.family, state.version)
        self.published.append(state)
        VERSIONS.labels(state.family).inc()
        PARTICIPANTS.labels(state.family).set(len(state.participants))
        log.info("published %s version %d from %d edges (%d samples)", state.family,
                 state.version, len(state.participants), state.num_samples)

    def _dead_letter(self, key: bytes | None, value: bytes, reason: str, detail: str,
                     partition: int, offset: int) -> None:
        self.dead_letters.send(
            key, value, reason=reason, detail=detail, source_topic=self.updates_topic,
            partition=partition, offset=offset)
        self.producer.poll(0)
        log.warning("model update at %s/%d@%d to dead-letter: %s: %s", self.updates_topic,
                    partition, offset, reason, detail)

    def close(self) -> None:
        self.producer.flush(10.0)


def make_app(kafka: KafkaSettings, settings: FederatedSettings,
             codec: Codec | None = None) -> tuple[faust.App, Coordinator]:
    """The coordinator's Faust app, with its agent and timer."""
    coord = Coordinator(kafka, settings, codec)
    app = coord.runtime.faust_app(settings.app_id)
    topic = app.topic(coord.updates_topic, key_type=bytes, value_type=bytes,
                      key_serializer="raw", value_serializer="raw")

    @app.agent(topic, name="model-updates")
    async def updates(stream: Any) -> None:
        async for event in stream.events():
            m = event.message
            coord.handle(m.key, m.value, m.partition, m.offset)

    @app.timer(1.0)
    async def deadlines() -> None:
        coord.tick()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def shutdown(sender: Any, *args: Any, **kw: Any) -> None:
        coord.close()

    return app, coord


def run_coordinator(kafka: KafkaSettings, settings: FederatedSettings,
                    loglevel: str = "warn") -> None:
    """Run the coordinator until SIGTERM/SIGINT (Faust's worker handles the signals)."""
    serve_metrics(settings.metrics_port)
    app, _ = make_app(kafka, settings)
    faust.Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
