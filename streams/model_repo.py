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
from typing import Any

from confluent_kafka import OFFSET_BEGINNING

from schemas.codec import Codec, CodecError
from schemas.federated import GlobalState, global_from_record
from streams import metrics
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)


class ModelRepository:
    """Versions of every family on ``global-model``; undecodable records are skipped and
    counted (``loadcast_consumer_skipped_total{client="model-repo"}``)."""

    def __init__(self, settings: KafkaSettings, codec: Codec, *,
                 client_id: str = "model-repo", metadata_timeout: float = 10.0) -> None:
        self.codec = codec
        self.client_id = client_id
        runtime = KafkaRuntime(settings)
        self.topic = runtime.topic("global-model")
        # KeyError when the topic does not exist
        conf: dict[str, Any] = {"client.id": client_id}
        self._reader = runtime.reader(self.topic, start=OFFSET_BEGINNING, follow=True,
                                      metadata_timeout=metadata_timeout, **conf)
        self._models: dict[str, dict[int, GlobalState]] = {}
        self.skipped = 0
        self._closed = False

    def refresh(self, timeout: float = 5.0) -> int:
        """Read what was published since the last call (until every partition is at its
        end, or ``timeout`` seconds); returns how many versions were added."""
        return sum(self._add(m.value()) for m in self._reader.read(timeout))

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
            self._reader.close()

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
