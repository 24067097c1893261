"""The sidecar's score subscriber: LoadScore and Anomaly records (and, for the traffic
director, MirrorStatus) from Kafka into the sidecar, through a :class:`streams.feeds.RecordFeed`
counted in the sidecar's metrics (``loadcast_sidecar_scores_{received,skipped}_total``).

Each poll's records are decoded and handed to ``deliver`` in one call (the sidecar applies
them on its event loop), so a burst of scores for one API becomes one weight change.
"""

from __future__ import annotations

from schemas.codec import Codec
from schemas.validation import DEFAULT_LIMITS, Limits
from streams.feeds import Batch, Deliver, FeedTopic, RecordFeed
from streams.kafka.producer import RecordProducer
from streams.kafka.settings import KafkaSettings
from streams.sidecar import metrics as m

__all__ = ["Batch", "ScoreSubscriber"]


class ScoreSubscriber(RecordFeed):
    """Scores and anomalies from ``lookback_s`` back; mirror statuses from
    ``mirror_status_lookback_s`` back when that is given."""

    def __init__(
        self,
        settings: KafkaSettings,
        codec: Codec,
        deliver: Deliver,
        *,
        sidecar_id: str,
        dead_letter: RecordProducer | None = None,
        lookback_s: float = 300.0,
        max_batch: int = 1000,
        mirror_status_lookback_s: float | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        topics = {
            "load-scores": FeedTopic(frozenset({"LoadScore"}), lookback_s),
            "anomalies": FeedTopic(frozenset({"Anomaly"}), lookback_s),
        }
        if mirror_status_lookback_s is not None:  # the traffic director's mirrors
            topics["mirror-status"] = FeedTopic(frozenset({"MirrorStatus"}),
                                                mirror_status_lookback_s)
        self.sidecar_id = sidecar_id
        super().__init__(
            settings, codec, deliver, client_id=f"sidecar-{sidecar_id}", topics=topics,
            dead_letter=dead_letter, max_batch=max_batch, limits=limits,
            on_received=lambda n: m.SCORES_RECEIVED.labels(sidecar_id).inc(n),
            on_skipped=lambda reason: m.SCORES_SKIPPED.labels(sidecar_id, reason).inc(),
        )
