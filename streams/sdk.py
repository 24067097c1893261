"""What users import: produce telemetry, consume routing decisions.

With a broker to talk to (so not a doctest)::

    from streams.sdk import TelemetryProducer, DecisionConsumer
    with TelemetryProducer(settings) as tp:
        tp.send(window)                                  # an EndpointTelemetry dict
    scores = DecisionConsumer(settings).latest_scores()  # {endpoint_id: LoadScore}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from types import TracebackType

from confluent_kafka import KafkaError, TopicPartition

from schemas.codec import Codec, CodecError
from schemas.records import EndpointTelemetry, LoadScore, RoutingDecision
from schemas.validation import reference_ms, score_problem
from streams import metrics
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)


def make_codec(settings: KafkaSettings) -> Codec:
    """The codec the settings ask for: a Schema Registry by URL, or the embedded ids."""
    return Codec.for_registry(settings.schema_registry_url)


class TelemetryProducer:
    """Produce EndpointTelemetry values, keyed and placed like the edge agent places them.

    ``send`` validates and encodes at once (raising :class:`schemas.codec.CodecError` for a
    bad record) and queues the record; ``flush`` waits for delivery.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        client_id: str = "sdk-telemetry",
        codec: Codec | None = None,
        max_buffered: int = 100_000,
    ) -> None:
        self.codec = codec or make_codec(settings)
        runtime = KafkaRuntime(settings)
        self.topic = runtime.topic("telemetry")
        self.producer = runtime.record_producer(client_id, max_buffered=max_buffered)

    def send(self, telemetry: EndpointTelemetry) -> bool:
        """Queue one window; False if the producer's buffer bound is full (counted)."""
        value = self.codec.encode("EndpointTelemetry", telemetry)
        ok = self.producer.produce(self.topic, value, telemetry["endpoint_id"].encode())
        self.producer.poll(0)
        return ok

    def flush(self, timeout: float = 30.0) -> int:
        return self.producer.flush(timeout)

    def __enter__(self) -> TelemetryProducer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.flush()


Decision = LoadScore | RoutingDecision


class DecisionConsumer:
    """Consume LoadScore (and RoutingDecision) records as typed objects.

    With ``group_id`` it joins a consumer group (each record to one member, offsets
    committed); without, it reads every partition from the start on its own, which is
    what :meth:`latest_scores` (the current state) needs. Records that do not decode are
    skipped and counted (``loadcast_consumer_skipped_total``).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        group_id: str | None = None,
        topics: tuple[str, ...] = ("load-scores", "routing-decisions"),
        codec: Codec | None = None,
        client_id: str = "sdk-decisions",
    ) -> None:
        self.codec = codec or make_codec(settings)
        self.client_id = client_id
        runtime = KafkaRuntime(settings)
        self.topics = [runtime.topic(t) for t in topics]
        self.group_id = group_id
        self.consumer = runtime.consumer(
            group_id, topics=self.topics if group_id is not None else (),
            **{"enable.partition.eof": True})
        if group_id is None:
            md = self.consumer.list_topics(timeout=10)
            parts = [
                TopicPartition(t, p, 0)
                for t in self.topics
                if t in md.topics
                for p in md.topics[t].partitions
            ]
            self.consumer.assign(parts)
            self._open = {(tp.topic, tp.partition) for tp in parts}
        self.skipped = 0

    def _decode(self, value: bytes) -> Decision | None:
        try:
            name = self.codec.name_of(value)
            record = self.codec.decode(value)
        except CodecError as e:
            self.skipped += 1
            metrics.CONSUMER_SKIPPED.labels(self.client_id, e.reason).inc()
            log.warning("skipping undecodable decision record: %s", e)
            return None
        if name == "loadcast.LoadScore":
            if score_problem(record, reference_ms()) is not None:  # from the future
                self.skipped += 1
                metrics.CONSUMER_SKIPPED.labels(self.client_id, "clock_skew").inc()
                log.warning("skipping a LoadScore computed in the future: %s",
                            record.get("endpoint_id"))
                return None
            return LoadScore.from_record(record)
        if name == "loadcast.RoutingDecision":
            return RoutingDecision.from_record(record)
        self.skipped += 1
        metrics.CONSUMER_SKIPPED.labels(self.client_id, "wrong_schema").inc()
        return None

    def poll(self, timeout: float = 1.0) -> Decision | None:
        """The next decision, or None if none arrived within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            msg = self.consumer.poll(left)
            if msg is None:
                return None
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if self.group_id is None:
                        self._open.discard((msg.topic(), msg.partition()))
                    continue
                log.warning("consumer error: %s", err)
                continue
            value = msg.value()
            decision = self._decode(value) if value is not None else None
            if decision is not None:
                return decision

    def __iter__(self) -> Iterator[Decision]:
        while True:
            d = self.poll(1.0)
            if d is not None:
                yield d

    def latest_scores(self, timeout: float = 10.0) -> dict[str, LoadScore]:
        """The newest LoadScore per endpoint, reading every partition to its end.

        Only without a group (the consumer must see every partition).
        """
        if self.group_id is not None:
            raise ValueError("latest_scores() reads all partitions: create without group_id")
        latest: dict[str, LoadScore] = {}
        deadline = time.monotonic() + timeout
        while self._open and time.monotonic() < deadline:
            d = self.poll(min(1.0, max(0.01, deadline - time.monotonic())))
            if isinstance(d, LoadScore):
                prev = latest.get(d.endpoint_id)
                if prev is None or d.computed_at >= prev.computed_at:
                    latest[d.endpoint_id] = d
        return latest

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> DecisionConsumer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
