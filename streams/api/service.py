"""``loadcast api`` as a process part: the Kafka feed into a :class:`ForecastState`, the
HTTP server over it, and the KEDA external scaler (gRPC, :mod:`streams.api.scaler`).

>>> import asyncio                                                  # doctest: +SKIP
>>> svc = ApiService(ApiSettings(port=0), kafka_settings)            # doctest: +SKIP
>>> asyncio.run(svc.run_until(stop_event))                           # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import TYPE_CHECKING

from aiohttp import web

from schemas.codec import Codec
from streams.api import metrics as m
from streams.api import openapi, placement, predict, scenarios, ui
from streams.api.app import create_app
from streams.api.config import ApiSettings
from streams.api.state import ForecastState
from streams.feeds import Batch, FeedTopic, RecordFeed
from streams.kafka.producer import RecordProducer
from streams.kafka.registry import codec_for
from streams.kafka.settings import KafkaSettings

if TYPE_CHECKING:
    from grpc import aio

log = logging.getLogger(__name__)

SUPERVISE_S = 1.0


class ApiService:
    """The API: state, feed (None without Kafka), HTTP server."""

    def __init__(self, settings: ApiSettings, kafka: KafkaSettings | None, *,
                 codec: Codec | None = None, client_id: str = "api") -> None:
        self.settings = settings
        self.kafka = kafka
        self.codec = codec or codec_for(kafka.schema_registry_url if kafka else None)
        self.client_id = client_id
        self.state = ForecastState(history_points=settings.history_points,
                                   max_endpoints=settings.max_endpoints)
        self.feed: RecordFeed | None = None
        self.dead_letter: RecordProducer | None = None
        self.app = create_app(self.state, settings, feed_alive=self.feed_alive)
        predict.add_routes(self.app)  # /v1/predict, /batch, /async, /v1/jobs, /v1/model/info
        placement.add_routes(self.app)  # POST /v1/optimize/placement
        scenarios.add_routes(self.app)  # POST /v1/scenarios
        ui.add_routes(self.app)  # GET /ui, the live control room
        openapi.add_routes(self.app)  # GET /openapi.json, of every route above
        self.port = 0
        self.keda_port = 0  # bound gRPC port of the KEDA scaler (0 = not serving)
        self._keda: aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._supervisor: asyncio.Task[None] | None = None

    def feed_alive(self) -> bool:
        return self.feed is None or self.feed.alive()

    def _topics(self) -> dict[str, FeedTopic]:
        s = self.settings
        return {
            "load-scores": FeedTopic(frozenset({"LoadScore"}), s.score_lookback_s),
            "anomalies": FeedTopic(frozenset({"Anomaly"}), s.score_lookback_s),
            "mirror-status": FeedTopic(frozenset({"MirrorStatus"}), s.mirror_lookback_s),
            "mirror-commands": FeedTopic(frozenset({"MirrorCommand"}), s.mirror_lookback_s),
            "global-model": FeedTopic(frozenset({"GlobalModel"}), None),  # compacted
        }

    async def start(self) -> None:
        """Start the feed (when there is Kafka), the HTTP server and the KEDA scaler."""
        loop = asyncio.get_running_loop()
        if self.kafka is not None:
            self.dead_letter = RecordProducer(self.kafka, self.client_id)

            def deliver(batch: Batch) -> None:
                loop.call_soon_threadsafe(self.state.apply, batch)

            self.feed = RecordFeed(
                self.kafka, self.codec, deliver, client_id=self.client_id,
                topics=self._topics(), dead_letter=self.dead_letter,
                on_received=m.RECORDS.inc,
                on_skipped=lambda reason: m.SKIPPED.labels(reason).inc(),
            )
            await asyncio.to_thread(self.feed.start)
            self._supervisor = asyncio.create_task(self._supervise(), name="api-supervise")
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.listen_host, self.settings.port,
                           reuse_address=True, backlog=1024)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.settings.port
        log.info("api on %s:%d", self.settings.listen_host, self.port)
        if self.settings.keda_enabled:
            from streams.api.scaler import start_scaler  # grpc only when serving it

            try:
                self._keda, self.keda_port = await start_scaler(
                    self.state, self.settings.listen_host, self.settings.resolved_keda_port(),
                    max_concurrent_rpcs=self.settings.keda_max_rpcs)
            except OSError:
                await self.stop()  # the feed and the HTTP server started above
                raise
            log.info("keda external scaler (gRPC) on %s:%d", self.settings.listen_host,
                     self.keda_port)

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_S)
            if self.feed is not None:
                self.feed.supervise()

    async def stop(self) -> None:
        """Stop the servers, the feed and the producer."""
        if self._keda is not None:
            await self._keda.stop(grace=1.0)  # open streams are cancelled after the grace
            self._keda = None
            self.keda_port = 0
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self.feed is not None:
            await asyncio.to_thread(self.feed.stop)
            self.feed = None
        if self.dead_letter is not None:
            await asyncio.to_thread(self.dead_letter.flush, 5)
            self.dead_letter = None

    async def run_until(self, stop: threading.Event) -> None:
        """Start, serve until ``stop`` is set, stop."""
        await self.start()
        try:
            while not stop.is_set():
                await asyncio.sleep(0.2)
        finally:
            await self.stop()
