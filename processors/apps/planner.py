"""The mirror planner (``loadcast planner``): thin Faust wiring around
:class:`processors.mirroring.MirrorPlanner`.

Its own Faust app rather than an agent inside the forecasting worker: the worker's
consumer group splits telemetry partitions among workers, so no single worker sees every
endpoint of an API in a region, which the planner needs to add their forecasts up; and
planning (a few records per second, one decision per (api, region) and second) should not
share an event loop with scoring. It consumes ``load-scores`` and ``mirror-status`` (for
measured activation times), evaluates every ``tick_seconds``, and produces signed
commands to ``mirror-commands`` keyed by region with a confluent-kafka producer
(aiokafka's idempotent producer fails against Tansu), flushed at once: a command is worth
nothing late.

Run **one** planner per cluster: a second one in the same group would get only some of
the score partitions. At start-up it reads its earlier commands back from
``mirror-commands`` (to the end, by Fetch) so it continues each (api, region) where it
left off: active or not, the sequence, when the last state change was. Undecodable
records go to ``dead-letter`` with the reason in the headers.

Faust settings as the other loadcast apps (``streams.kafka.faust_config``): short
session timeouts for Tansu, no tables, topics not declared by Faust, raw values.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
from prometheus_client import Counter, Gauge

from processors.apps.mirror_settings import MirrorSettings
from processors.mirroring import MirrorPlanner
from schemas.codec import Codec, CodecError, Record
from schemas.validation import DEFAULT_LIMITS, Limits, reference_ms, score_problem
from streams.kafka.registry import codec_for
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings
from streams.metrics import serve_metrics

log = logging.getLogger(__name__)

COMMANDS = Counter("loadcast_planner_commands_total", "Mirror commands issued",
                   ["action"])
INPUTS = Counter("loadcast_planner_records_total", "Records consumed by outcome",
                 ["topic", "outcome"])
ACTIVATION = Gauge("loadcast_planner_activation_seconds",
                   "Activation time planned for (slowest recent command -> READY)", ["api"])


def now_ms() -> int:
    return int(time.time() * 1000)


def read_commands(runtime: KafkaRuntime, codec: Codec, timeout: float = 20.0) -> list[Record]:
    """Every MirrorCommand on the topic (each partition read to its end by Fetch)."""
    out: list[Record] = []
    for msg in runtime.read_to_end(runtime.topic("mirror-commands"), timeout=timeout,
                                   max_records=500):
        try:
            out.append(codec.decode(msg.value() or b"", "MirrorCommand"))
        except CodecError as e:
            log.warning("skipping undecodable command at %d: %s", msg.offset(), e)
    return out


class Planner:
    """The planner's Kafka side; :meth:`handle_score`, :meth:`handle_status` and
    :meth:`tick` are synchronous and usable without Faust."""

    def __init__(self, kafka: KafkaSettings, settings: MirrorSettings,
                 codec: Codec | None = None, *, restore: bool = True,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.kafka = kafka
        self.settings = settings
        self.codec = codec or codec_for(kafka.schema_registry_url)
        self.logic = MirrorPlanner(settings.planner_config(), settings.signer())
        self.runtime = KafkaRuntime(kafka)
        self.producer = self.runtime.record_producer(f"{settings.planner_app_id}-out",
                                                     linger_ms=0.0)
        self.scores_topic = self.runtime.topic("load-scores")
        self.status_topic = self.runtime.topic("mirror-status")
        self.commands_topic = self.runtime.topic("mirror-commands")
        self.dead_topic = self.runtime.topic("dead-letter")
        self.dead_letters = self.runtime.dead_letter(self.producer,
                                                     client=f"{settings.planner_app_id}-out")
        self.limits = limits
        self.issued: list[Record] = []
        if restore:
            n = self.logic.restore(read_commands(self.runtime, self.codec))
            log.info("planner restored %d earlier commands", n)

    def _decode(self, topic: str, expect: str, key: bytes | None, value: bytes | None,
                partition: int, offset: int) -> Record | None:
        try:
            if value is None:
                raise CodecError("invalid", "record has no value")
            return self.codec.decode(value, expect)
        except CodecError as e:
            self._dead(topic, key, value, e.reason, str(e), partition, offset)
            return None

    def _dead(self, topic: str, key: bytes | None, value: bytes | None, reason: str,
              detail: str, partition: int, offset: int) -> None:
        INPUTS.labels(topic, "dead_letter").inc()
        log.warning("%s at %d@%d to dead-letter: %s", topic, partition, offset, detail)
        self.dead_letters.send(key, value, reason=reason, detail=detail, source_topic=topic,
                               partition=partition, offset=offset)
        self.producer.poll(0)

    def handle_score(self, key: bytes | None, value: bytes | None, partition: int = -1,
                     offset: int = -1, timestamp_ms: int | None = None) -> None:
        r = self._decode(self.scores_topic, "LoadScore", key, value, partition, offset)
        problem = (score_problem(r, reference_ms(timestamp_ms), self.limits)
                   if r is not None else None)
        if problem is not None:  # from the future: it would win over every genuine score
            self._dead(self.scores_topic, key, value, problem[0], problem[1], partition, offset)
            return
        if r is not None:
            INPUTS.labels(self.scores_topic, "ok").inc()
            self.logic.observe_score(r, now_ms())

    def handle_status(self, key: bytes | None, value: bytes | None, partition: int = -1,
                      offset: int = -1) -> None:
        r = self._decode(self.status_topic, "MirrorStatus", key, value, partition, offset)
        if r is not None:
            INPUTS.labels(self.status_topic, "ok").inc()
            measured = self.logic.observe_status(r)
            if measured is not None:
                log.info("%s in %s: ready %.2f s after the command", r["api"], r["region"],
                         measured)
                ACTIVATION.labels(r["api"]).set(self.logic.activation_estimate(r["api"]))

    def tick(self, now: int | None = None) -> list[Record]:
        """Evaluate every (api, region) and publish the commands due."""
        cmds = self.logic.evaluate(now_ms() if now is None else now)
        for c in cmds:
            self.producer.produce(self.commands_topic, self.codec.encode("MirrorCommand", c),
                                  str(c["region"]).encode())
            COMMANDS.labels(c["action"]).inc()
            log.info("%s %s in %s (sequence %d): %s", c["action"], c["api"], c["region"],
                     c["sequence"], c["reason"])
        if cmds:
            left = self.producer.flush(10.0)
            if left:
                log.error("%d mirror commands not yet delivered", left)
            self.issued.extend(cmds)
        else:
            self.producer.poll(0)
        return cmds

    def close(self) -> None:
        self.producer.flush(10.0)


def make_app(kafka: KafkaSettings, settings: MirrorSettings,
             codec: Codec | None = None) -> tuple[faust.App, Planner]:
    """The planner's Faust app: two agents and a timer."""
    planner = Planner(kafka, settings, codec)
    app = planner.runtime.faust_app(settings.planner_app_id)
    raw: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw",
                           "value_serializer": "raw"}
    scores = app.topic(planner.scores_topic, **raw)
    statuses = app.topic(planner.status_topic, **raw)

    @app.agent(scores, name="load-scores")
    async def on_scores(stream: Any) -> None:
        async for event in stream.events():
            m = event.message
            ts = m.timestamp  # seconds (Faust)
            planner.handle_score(m.key, m.value, m.partition, m.offset,
                                 round(ts * 1000) if ts else None)

    @app.agent(statuses, name="mirror-status")
    async def on_status(stream: Any) -> None:
        async for event in stream.events():
            m = event.message
            planner.handle_status(m.key, m.value, m.partition, m.offset)

    @app.timer(settings.tick_seconds)
    async def evaluate() -> None:
        planner.tick()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def shutdown(sender: Any, *args: Any, **kw: Any) -> None:
        planner.close()

    return app, planner


def run_planner(kafka: KafkaSettings, settings: MirrorSettings, loglevel: str = "warn") -> None:
    """Run the planner until SIGTERM/SIGINT (Faust's worker handles the signals)."""
    serve_metrics(settings.planner_metrics_port)
    app, _ = make_app(kafka, settings)
    faust.Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
