"""The topic catalog of the architecture, and the idempotent "ensure topics" step."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic

from streams.kafka.clients import new_admin

if TYPE_CHECKING:  # annotations only: settings import the broker watch, which needs this
    from streams.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    """One loadcast topic: its short name, what it carries, how it is keyed, its config."""

    name: str
    value_schema: str
    key: str
    config: dict[str, str] = field(default_factory=dict)
    internal: bool = False  # loadcast's own bookkeeping, not for users or the sink


CATALOG: tuple[TopicSpec, ...] = (
    TopicSpec("telemetry", "EndpointTelemetry | TelemetryBatch", "endpoint_id"),
    TopicSpec("load-scores", "LoadScore", "endpoint_id"),
    TopicSpec("mirror-commands", "MirrorCommand", "region"),
    TopicSpec("mirror-status", "MirrorStatus", "region"),
    TopicSpec("routing-decisions", "RoutingDecision", "sidecar_id"),
    TopicSpec("model-updates", "ModelUpdate", "model family"),
    # The global model repository: the latest version per family must survive forever.
    TopicSpec("global-model", "GlobalModel", "model family", {"cleanup.policy": "compact"}),
    TopicSpec("anomalies", "Anomaly", "endpoint_id"),
    TopicSpec("dead-letter", "raw bytes; headers say why", "original key"),
    # The task API (streams.tasks) and its swarm (streams.swarm): one record per attempt;
    # the latest status of every task must survive forever (any API replica, or a restarted
    # one, answers for every task from it); results are read once by the API and the sink.
    TopicSpec("tasks", "Task", "task_id"),
    TopicSpec("task-status", "TaskStatus", "task_id", {"cleanup.policy": "compact"}),
    TopicSpec("task-results", "TaskResult", "task_id"),
    # Internal: processor model snapshots, co-partitioned with telemetry (same count, the
    # snapshot of an endpoint sits in the partition number of its telemetry).
    TopicSpec("processor-snapshots", "ModelSnapshot", "endpoint_id",
              {"cleanup.policy": "compact"}, internal=True),
)
SHORT_NAMES = tuple(t.name for t in CATALOG)


def topic_name(settings: KafkaSettings, short: str) -> str:
    """Full topic name, e.g. ``loadcast.telemetry``."""
    if short not in SHORT_NAMES:
        raise KeyError(f"unknown topic {short!r}; known: {', '.join(SHORT_NAMES)}")
    return f"{settings.topic_prefix}{short}"


def ensure_topics(settings: KafkaSettings, timeout: float = 15.0) -> dict[str, str]:
    """Create the catalog's topics that do not exist yet; return ``{topic: outcome}``.

    Safe to run from every process at start-up: an existing topic is left as it is (a
    partition count that differs from the settings is logged, not changed).
    """
    admin = new_admin(settings.client_config())
    existing = admin.list_topics(timeout=timeout).topics
    outcome: dict[str, str] = {}
    wanted = []
    for spec in CATALOG:
        name = topic_name(settings, spec.name)
        if name in existing:
            n = len(existing[name].partitions)
            outcome[name] = "exists"
            if n != settings.partitions:
                log.warning("%s has %d partitions, settings say %d", name, n, settings.partitions)
            continue
        wanted.append(
            NewTopic(
                name,
                num_partitions=settings.partitions,
                replication_factor=settings.replication_factor,
                config=dict(spec.config),
            )
        )
    if wanted:
        for name, fut in admin.create_topics(wanted, request_timeout=timeout).items():
            try:
                fut.result(timeout)
                outcome[name] = "created"
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
                outcome[name] = "exists"  # another process won the race
    return outcome


def partition_count(settings: KafkaSettings, topic: str, timeout: float = 10.0) -> int:
    """How many partitions ``topic`` has (KeyError if it does not exist)."""
    md = new_admin(settings.client_config()).list_topics(topic, timeout=timeout)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        raise KeyError(f"topic {topic} does not exist")
    return len(t.partitions)
