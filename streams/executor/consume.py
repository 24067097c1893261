"""The executor's command consumer: every partition of ``mirror-commands``, no consumer
group. It resumes at the offsets of the state file; a partition it has never read starts
``lookback_s`` back in time (commands older than that have expired anyway)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from streams.executor.state import now_ms
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)


def new_consumer(kafka: KafkaSettings, client_id: str) -> Consumer:
    """The executor's consumer (from the Kafka runtime): no group, nothing committed."""
    overrides: dict[str, Any] = {"client.id": client_id, "enable.partition.eof": False,
                                 "fetch.wait.max.ms": 50}
    return KafkaRuntime(kafka).consumer(None, **overrides)


def open_commands(kafka: KafkaSettings, client_id: str, topic: str,
                  offsets: Mapping[int, int], lookback_s: float) -> Consumer:
    """A consumer assigned every partition of ``topic``: at ``offsets`` where known,
    else ``lookback_s`` back (the start when that cannot be located)."""
    c = new_consumer(kafka, client_id)
    try:
        _assign(c, topic, offsets, lookback_s)
    except BaseException:
        c.close()
        raise
    return c


def _assign(c: Consumer, topic: str, offsets: Mapping[int, int], lookback_s: float) -> None:
    md = c.list_topics(topic, timeout=10)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        raise RuntimeError(f"topic {topic} does not exist")
    parts = sorted(t.partitions)
    known = [TopicPartition(topic, p, offsets[p]) for p in parts if p in offsets]
    new = [TopicPartition(topic, p, now_ms() - int(lookback_s * 1000))
           for p in parts if p not in offsets]
    if new:
        try:
            located = c.offsets_for_times(new, timeout=10)
            new = [TopicPartition(tp.topic, tp.partition,
                                  tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                   for tp in located]
        except KafkaException as e:
            log.warning("offsets_for_times failed (%s): reading commands from the start", e)
            new = [TopicPartition(tp.topic, tp.partition, OFFSET_BEGINNING) for tp in new]
    c.assign(known + new)


def next_command(c: Consumer, timeout: float) -> Message | None:
    """The next record within ``timeout``; None on none (an error is logged)."""
    msg = c.poll(timeout)
    if msg is None:
        return None
    err = msg.error()
    if err is None:
        return msg
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("command consumer: %s", err)
    return None
