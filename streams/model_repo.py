"""The global model repository: the compacted ``global-model`` topic, read back.

Every GlobalModel record is keyed by its model family, so after compaction the topic holds
at least the latest version of each family (older versions stay until the broker compacts
them).  :class:`ModelRepository` reads the topic from the beginning (assigned partitions,
no consumer group: every reader sees everything) and keeps, per family, each version it
saw; :meth:`ModelRepository.refresh` picks up what was published since.

>>> # repo = ModelRepository(kafka_settings, codec); repo.refresh()
>>> # repo.latest("default-rls/60s/86400s/h15").version
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas.codec import Codec, CodecError
from schemas.federated import GlobalState, global_from_record
from streams import metrics
from streams.settings import KafkaSettings
from streams.topics import topic_name

log = logging.getLogger(__name__)


class ModelRepository:
    """Versions of every family on ``global-model``; undecodable records are skipped and
    counted (``loadcast_consumer_skipped_total{client="model-repo"}``)."""

    def __init__(self, settings: KafkaSettings, codec: Codec, *,
                 client_id: str = "model-repo", metadata_timeout: float = 10.0) -> None:
        self.codec = codec
        self.client_id = client_id
        self.topic = topic_name(settings, "global-model")
        conf = settings.consumer_config(
            None, **{"enable.partition.eof": True, "client.id": client_id}
        )
        self._consumer = Consumer(conf)
        md = self._consumer.list_topics(self.topic, timeout=metadata_timeout)
        t = md.topics.get(self.topic)
        if t is None or t.error is not None:
            self._consumer.close()
            raise KeyError(f"topic {self.topic} does not exist (run `loadcast topics ensure`)")
        self._parts = sorted(t.partitions)
        self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING)
                               for p in self._parts])
        self._at_eof: set[int] = set()
        self._models: dict[str, dict[int, GlobalState]] = {}
        self.skipped = 0
        self._closed = False

    def refresh(self, timeout: float = 5.0) -> int:
        """Read what was published since the last call (until every partition is at its
        end, or ``timeout`` seconds); returns how many versions were added."""
        added = 0
        deadline = time.monotonic() + timeout
        first = True
        while first or (len(self._at_eof) < len(self._parts) and time.monotonic() < deadline):
            first = False
            wait = max(0.0, min(0.2, deadline - time.monotonic()))
            for m in self._consumer.consume(500, wait):
                err, part = m.error(), m.partition() or 0
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        self._at_eof.add(part)
                    else:
                        log.warning("global-model read error: %s", err)
                    continue
                self._at_eof.discard(part)
                added += self._add(m.value())
        return added

    def _add(self, value: bytes | None) -> int:
        try:
            if value is None:
                raise CodecError("invalid", "empty value")
            state = global_from_record(self.codec.decode(value, "GlobalModel"))
        except (CodecError, ValueError, KeyError) as e:
            reason = e.reason if isinstance(e, CodecError) else "invalid"
            self.skipped += 1
            metrics.CONSUMER_SKIPPED.labels(self.client_id, reason).inc()
            log.warning("skipping an undecodable GlobalModel record: %s", e)
            return 0
        versions = self._models.setdefault(state.family, {})
        new = state.version not in versions
        versions[state.version] = state
        return int(new)

    def families(self) -> list[str]:
        return sorted(self._models)

    def versions(self, family: str) -> list[GlobalState]:
        """Every version of ``family`` read so far, oldest first."""
        return [v for _, v in sorted(self._models.get(family, {}).items())]

    def latest(self, family: str) -> GlobalState | None:
        vs = self._models.get(family)
        return vs[max(vs)] if vs else None

    def get(self, family: str, version: int) -> GlobalState | None:
        return self._models.get(family, {}).get(version)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._consumer.close()

    def __enter__(self) -> ModelRepository:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def fetch_latest(settings: KafkaSettings, codec: Codec, family: str,
                 timeout: float = 10.0) -> GlobalState | None:
    """The latest published version of ``family`` (None if there is none): one read of
    the repository, for a process starting up (e.g. the processor worker, to warm-start
    new endpoints)."""
    with ModelRepository(settings, codec, client_id="model-repo-fetch") as repo:
        repo.refresh(timeout)
        return repo.latest(family)
