"""The Kafka runtime: one object made from :class:`KafkaSettings` that hands out clients.

In the spirit of Quix Streams' ``Application``: it owns the connection settings and
every service asks it for what it needs instead of building Kafka clients itself::

    rt = KafkaRuntime(kafka_settings)
    rt.ensure_topics()                       # KafkaUnreachable: "cannot reach Kafka at …"
    producer = rt.record_producer("worker-out", linger_ms=2.0)
    dead = rt.dead_letter(producer, client="worker-out")
    for msg in rt.read_to_end(rt.topic("mirror-commands"), timeout=20):
        ...
    app = rt.faust_app("loadcast-worker")

Shared client settings (SASL/TLS, the broker watch's error callback and logger) come from
:meth:`KafkaSettings.client_config`; consumers from :meth:`KafkaSettings.consumer_config`;
Faust apps from :mod:`streams.kafka.faust_config`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from streams.kafka.brokerwatch import BrokerWatch, watch
from streams.kafka.clients import new_admin, new_consumer, new_producer
from streams.kafka.deadletter import DeadLetterWriter
from streams.kafka.producer import RecordProducer
from streams.kafka.reader import TopicReader
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import ensure_topics, topic_name

if TYPE_CHECKING:
    import faust


class KafkaUnreachable(RuntimeError):
    """Kafka did not answer: the one error (and message) for every loadcast process."""

    def __init__(self, bootstrap_servers: str, detail: object) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.detail = str(detail)
        super().__init__(f"cannot reach Kafka at {bootstrap_servers}: {detail}")


class KafkaRuntime:
    """Producers, consumers, admin clients and Faust apps for one Kafka cluster."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings

    def __repr__(self) -> str:
        return f"KafkaRuntime({self.settings.bootstrap_servers!r})"

    # ------------------------------------------------------------------ names

    def topic(self, short: str) -> str:
        """The full name of a catalog topic (``load-scores`` -> ``loadcast.load-scores``)."""
        return topic_name(self.settings, short)

    # ------------------------------------------------------------------ clients

    def producer(self, **overrides: Any) -> Producer:
        """A bare confluent-kafka producer with the shared client settings."""
        conf = self.settings.client_config()
        conf.update(overrides)
        return new_producer(conf)

    def record_producer(self, client_id: str, **kwargs: Any) -> RecordProducer:
        """The bounded, counted, idempotent :class:`streams.kafka.producer.RecordProducer`."""
        return RecordProducer(self.settings, client_id, **kwargs)

    def consumer(self, group_id: str | None, *, topics: Sequence[str] = (),
                 **overrides: Any) -> Consumer:
        """A consumer (``group_id`` None: no group, nothing committed), subscribed to
        ``topics`` when given. ``overrides`` are librdkafka properties."""
        c = new_consumer(self.settings.consumer_config(group_id, **overrides))
        if topics:
            c.subscribe(list(topics))
        return c

    def admin(self, **overrides: Any) -> AdminClient:
        conf = self.settings.client_config()
        conf.update(overrides)
        return new_admin(conf)

    def faust_app(self, app_id: str, **kwargs: Any) -> faust.App:
        """A Faust app with loadcast's Faust settings (:mod:`streams.kafka.faust_config`);
        ``kwargs`` override them."""
        import faust  # imported when a Faust app is made: a second of start-up otherwise

        from streams.kafka.faust_config import faust_settings

        return faust.App(app_id, **{**faust_settings(self.settings), **kwargs})

    # ------------------------------------------------------------------ reading

    def reader(self, topic: str, *, partitions: Sequence[int] | None = None, start: int = 0,
               follow: bool = False, metadata_timeout: float = 10.0,
               **overrides: Any) -> TopicReader:
        """A :class:`TopicReader` of ``topic`` (no group); close it when done."""
        c = self.consumer(None, **{**overrides, "enable.partition.eof": True})
        return TopicReader(c, topic, partitions=partitions, start=start, follow=follow,
                           metadata_timeout=metadata_timeout)

    def read_to_end(self, topic: str, *, timeout: float,
                    partitions: Sequence[int] | None = None,
                    max_records: int = 1000) -> Iterator[Message]:
        """Every record of ``topic`` (or of ``partitions``), each partition read from 0 to
        its end by Fetch; ``TimeoutError`` when the end is not reached in ``timeout``
        seconds, ``KeyError`` when the topic does not exist."""
        with self.reader(topic, partitions=partitions) as r:
            yield from r.read_to_end(timeout, max_records)

    def watermarks(self, topic: str, partitions: Sequence[int],
                   timeout: float = 10.0) -> dict[int, tuple[int, int]]:
        """``{partition: (low, high)}`` offsets of ``topic`` (KafkaException on failure)."""
        c = self.consumer(None)
        out: dict[int, tuple[int, int]] = {}
        try:
            for p in partitions:
                low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout)
                out[p] = (int(low), int(high))
            return out
        finally:
            c.close()

    # ------------------------------------------------------------------ dead letters

    def dead_letter(self, producer: Any, *, client: str,
                    topic: str = "dead-letter") -> DeadLetterWriter:
        """The dead-letter writer (standard ``loadcast.*`` headers) on ``producer``;
        ``topic`` is the catalog name."""
        return DeadLetterWriter(producer, self.topic(topic), client=client)

    # ------------------------------------------------------------------ the cluster

    def check_reachable(self, timeout: float = 10.0) -> None:
        """Raise :class:`KafkaUnreachable` unless a broker answers a metadata request
        within ``timeout`` seconds."""
        # Quiet: a failed check is this error, not an outage report of the broker watch.
        conf = {k: v for k, v in self.settings.client_config().items()
                if k not in ("error_cb", "logger")}
        conf["log_level"] = 0
        try:
            md = new_admin(conf).list_topics(timeout=timeout)
        except Exception as e:  # KafkaException (transport, timeout), resolver errors
            raise KafkaUnreachable(self.settings.bootstrap_servers, e) from e
        if not md.brokers:
            raise KafkaUnreachable(self.settings.bootstrap_servers, "no brokers in metadata")

    def ensure_topics(self, timeout: float = 15.0) -> dict[str, str]:
        """Create the catalog's missing topics (:func:`streams.kafka.topics.ensure_topics`);
        :class:`KafkaUnreachable` when that fails."""
        try:
            return ensure_topics(self.settings, timeout)
        except Exception as e:
            raise KafkaUnreachable(self.settings.bootstrap_servers, e) from e

    def watch(self, name: str | None = None) -> BrokerWatch:
        """The process's broker watch, attached to these settings."""
        return watch(self.settings, name)
