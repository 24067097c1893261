"""What the executor tells: a MirrorStatus record per state change (on ``mirror-status``,
keyed by region) and a dead letter per undecodable command."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from schemas.codec import Codec
from streams.executor.state import now_ms
from streams.kafka.deadletter import DeadLetterWriter
from streams.kafka.producer import RecordProducer

log = logging.getLogger(__name__)


@dataclass
class Reporter:
    """Statuses and dead letters of one executor, through one producer."""

    producer: RecordProducer
    codec: Codec
    executor_id: str
    region: str
    status_topic: str
    commands_topic: str
    dead_topic: str
    statuses: list[dict[str, Any]] = field(default_factory=list)  # all reported (tests)

    def status(self, api: str, command_id: str, sequence: int, state: str, *,
               url: str | None = None, digest: str | None = None, reason: str = "",
               capacity: float | None = None) -> None:
        rec = {"executor_id": self.executor_id, "region": self.region, "api": api,
               "command_id": command_id, "sequence": int(sequence), "state": state,
               "at": now_ms(), "instance_url": url, "bundle_digest": digest,
               "reason": reason[:1000], "capacity_rps": capacity}
        self.statuses.append(rec)
        self.producer.produce(self.status_topic, self.codec.encode("MirrorStatus", rec),
                              self.region.encode())
        self.producer.poll(0)

    def dead_letter(self, key: bytes | None, value: bytes, reason: str, detail: str,
                    partition: int, offset: int) -> None:
        log.warning("mirror command at %d@%d to dead-letter: %s", partition, offset, detail)
        client = f"executor-{self.executor_id}"
        DeadLetterWriter(self.producer, self.dead_topic, client=client).send(
            key, value, reason=reason, detail=detail, source_topic=self.commands_topic,
            partition=partition, offset=offset, consumer=client)
        self.producer.poll(0)

    def flush(self, timeout: float) -> None:
        self.producer.flush(timeout)
