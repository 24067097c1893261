"""The Faust worker (``loadcast worker``): thin wiring around :class:`processors.engine.Engine`.

One agent consumes the telemetry topic; outputs (scores, anomalies, dead letters,
snapshots) go through a confluent-kafka producer (idempotent; aiokafka's idempotent
producer fails against Tansu). The Faust settings, and why, are in
``streams.kafka.faust_config``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
from faust.types import TP
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from processors.apps.global_trees import refit_trees
from processors.apps.settings import ProcessorSettings
from processors.endpoint import EndpointModel
from processors.engine import Engine
from processors.federated.coldstart import warm_start
from processors.federated.params import family_of
from processors.forecasting.kernels import warm_up
from processors.treelog import SnapshotRecord
from schemas.codec import Codec, CodecError, Record
from streams.kafka.brokerwatch import quiet_aiokafka
from streams.kafka.registry import codec_for
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings
from streams.metrics import serve_metrics
from streams.model_repo import ModelRepository

log = logging.getLogger(__name__)

SCORES = Counter("loadcast_processor_scores_published_total", "LoadScore records published")
ANOMALIES = Counter("loadcast_processor_anomalies_total", "Anomaly records published")
DEAD = Counter("loadcast_processor_dead_letters_total", "Records sent to dead-letter", ["reason"])


#: Metrics read from the engine when Prometheus scrapes (:class:`EngineMetrics`), not
#: counted per window: per-window counter and gauge updates were ~3 % of the single-record
#: cost. Sample name -> (type, help).
SCRAPED_METRICS = {
    "loadcast_processor_windows_total": ("counter", "Endpoint-windows applied"),
    "loadcast_processor_replayed_total": (
        "counter", "Windows skipped because a snapshot already had them"),
    "loadcast_processor_endpoints": ("gauge", "Endpoint models held by this worker"),
    "loadcast_processor_partitions": ("gauge", "Telemetry partitions assigned and recovered"),
    "loadcast_processor_snapshot_age_seconds": ("gauge", "Seconds since the last snapshot round"),
    "loadcast_processor_evicted_total": (
        "counter", "Idle endpoint models evicted to stay under the max_endpoints caps"),
    "loadcast_processor_global_trees_refits_total": (
        "counter", "Refits of the worker's global trees"),
    "loadcast_processor_global_trees_version": (
        "gauge", "Version of the global trees new endpoints get (0: none)"),
}


class EngineMetrics:
    """Prometheus collector of :data:`SCRAPED_METRICS` for one worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterable[Metric]:
        w = self.worker
        s = w.engine.stats
        trees = w.engine.trees
        values = {
            "loadcast_processor_windows_total": s.windows,
            "loadcast_processor_replayed_total": s.skipped_replayed,
            "loadcast_processor_endpoints": w.engine.endpoints(),
            "loadcast_processor_partitions": w.engine.partitions_ready(),
            "loadcast_processor_snapshot_age_seconds": time.monotonic() - w.last_snapshot,
            "loadcast_processor_evicted_total": s.evicted,
            "loadcast_processor_global_trees_refits_total": trees.refits if trees else 0,
            "loadcast_processor_global_trees_version":
                trees.current.version if trees and trees.current else 0,
        }
        for name, (kind, doc) in SCRAPED_METRICS.items():
            if kind == "counter":
                yield CounterMetricFamily(name.removesuffix("_total"), doc, value=values[name])
            else:
                yield GaugeMetricFamily(name, doc, value=values[name])


class KafkaOutputs:
    """The engine's outputs, produced with confluent-kafka."""

    def __init__(self, runtime: KafkaRuntime, client_id: str) -> None:
        self.producer = runtime.record_producer(client_id, linger_ms=2.0)
        self.scores = runtime.topic("load-scores")
        self.anomalies = runtime.topic("anomalies")
        self.dead = runtime.topic("dead-letter")
        self.telemetry = runtime.topic("telemetry")
        self.snapshots = runtime.topic("processor-snapshots")
        self.dead_letters = runtime.dead_letter(self.producer, client=client_id)

    def score(self, endpoint_id: str, value: bytes) -> None:
        self.producer.produce(self.scores, value, endpoint_id.encode())
        SCORES.inc()

    def anomaly(self, endpoint_id: str, value: bytes) -> None:
        self.producer.produce(self.anomalies, value, endpoint_id.encode())
        ANOMALIES.inc()

    def dead_letter(self, key: bytes | None, value: bytes, reason: str, detail: str,
                    partition: int, offset: int) -> None:
        self.dead_letters.send(key, value, reason=reason, detail=detail,
                               source_topic=self.telemetry, partition=partition, offset=offset)
        DEAD.labels(reason).inc()


def read_snapshots(
    runtime: KafkaRuntime, codec: Codec, partitions: list[int], timeout: float = 30.0
) -> tuple[dict[int, list[Record]], dict[int, int]]:
    """Every ModelSnapshot of ``partitions`` (oldest first, read to each partition's end
    by Fetch, not ListOffsets), and the first available telemetry offset of each."""
    marks = runtime.watermarks(runtime.topic("telemetry"), partitions)
    starts = {p: low for p, (low, _) in marks.items()}
    out: dict[int, list[Record]] = {p: [] for p in partitions}
    snapshots = runtime.topic("processor-snapshots")
    for msg in runtime.read_to_end(snapshots, timeout=timeout, partitions=partitions):
        if msg.value() is None:  # tombstone: the model was evicted
            key = (msg.key() or b"").decode(errors="replace")
            out[msg.partition() or 0].append({"endpoint_id": key, "format": "evicted"})
            continue
        try:
            out[msg.partition() or 0].append(codec.decode(msg.value() or b"", "ModelSnapshot"))
        except CodecError as e:
            log.error("skipping undecodable snapshot at %d: %s", msg.offset(), e)
    return out, starts


# Shutdown: snapshot flushes wait this long, and the process exits STOP_WITHIN_S after
# SIGTERM/SIGINT whatever it is waiting for (the last checkpoint stands).
SHUTDOWN_FLUSH_S = 3.0
STOP_WITHIN_S = 8.0

# A round is paced: SNAPSHOT_CHUNK models (~0.5 ms and ~200 KB each), then a pause, so
# scoring and the broker keep up instead of taking a burst of every model at once.
SNAPSHOT_CHUNK = 8
SNAPSHOT_PAUSE = 0.005


class Worker:
    """The Faust app and the engine it feeds."""

    def __init__(self, kafka: KafkaSettings, settings: ProcessorSettings,
                 codec: Codec | None = None) -> None:
        self.kafka = kafka
        self.settings = settings
        self.codec = codec or codec_for(kafka.schema_registry_url)
        self.runtime = KafkaRuntime(kafka)
        self.outputs = KafkaOutputs(self.runtime, f"{settings.app_id}-out")
        self.models: Any = None
        if settings.warm_start and settings.forecaster == "default":
            self.models = ModelRepository(kafka, self.codec, client_id=f"{settings.app_id}-models")
            self.models.refresh(10)
        self.engine = Engine(settings.config(), self.codec, self.outputs,
                             warm_start=self._warm_start if self.models is not None else None,
                             trees=settings.shared_trees())
        self._fits = ThreadPoolExecutor(1, thread_name_prefix="global-trees")  # one refit
        self.last_snapshot = time.monotonic()
        self._snapshot_lock = asyncio.Lock()
        self.app = self.runtime.faust_app(settings.app_id)
        self.telemetry = self.app.topic(
            self.runtime.topic("telemetry"), key_type=bytes, value_type=bytes,
            key_serializer="raw", value_serializer="raw",
        )
        # A lost broker: logged once (then every 30 s), not per failed fetch; on its
        # return with an empty log, the worker keeps its models and starts again at 0.
        self.watch = self.runtime.watch(name=f"worker {settings.app_id}")
        quiet_aiokafka()
        self.watch.on_return(self._broker_back)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parked: dict[int, Any] = {}  # revoked during an outage, without a snapshot
        self._round_ok = True
        self._wire()

    def _wire(self) -> None:
        app, engine, producer = self.app, self.engine, self.outputs.producer

        @app.agent(self.telemetry, name="telemetry")
        async def process(stream: Any) -> None:
            self._loop = asyncio.get_running_loop()
            n = 0
            async for event in stream.events():
                m = event.message
                ts = m.timestamp  # seconds (Faust); the Kafka timestamp of the record
                try:
                    engine.handle(m.partition, m.offset, m.key, m.value,
                                  timestamp_ms=round(ts * 1000) if ts else None)
                except Exception as e:  # one record must never stop the agent
                    log.exception("record p%d@%d failed", m.partition, m.offset)
                    self.outputs.dead_letter(m.key, m.value or b"", "internal_error",
                                             f"{type(e).__name__}: {e}", m.partition, m.offset)
                n += 1
                if n % 64 == 0:
                    producer.poll(0)

        self._wire_timers()

        @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # mode stub wants signal=
        async def assigned(sender: Any, *args: Any, **kw: Any) -> None:
            assigned: set[TP] = args[0] if args else kw["assigned"]
            mine = {tp.partition for tp in assigned if tp.topic == self.telemetry.get_topic_name()}
            for p in list(engine.partitions):
                if p not in mine:
                    engine.drop(p)
            parked, self._parked = self._parked, {}
            back = sorted(p for p in mine - set(engine.partitions) if p in parked)
            for p in back:  # ours before the broker went away: models kept, in place
                engine.partitions[p] = parked[p]
            new = sorted(mine - set(engine.partitions))
            for p in new:
                engine.hold(p)  # before any await: nothing is applied until restored
            if back:
                await self.readopt(back)
            if new:
                await self.recover(new)

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def revoked(sender: Any, *args: Any, **kw: Any) -> None:
            revoked: set[TP] = args[0] if args else kw["revoked"]
            gone = [tp.partition for tp in revoked
                    if tp.topic == self.telemetry.get_topic_name()
                    and tp.partition in engine.partitions]
            if gone:
                ok = False
                if not self.watch.lost:
                    await self.snapshot(gone)
                    ok = self._round_ok
                for p in gone:
                    if ok:
                        engine.drop(p)
                    else:  # no snapshot holds them: keep them in case they come back
                        self._parked[p] = engine.partitions.pop(p)

        @app.on_before_shutdown.connect  # type: ignore[arg-type]
        async def shutdown(sender: Any, *args: Any, **kw: Any) -> None:
            if self.watch.lost:
                log.warning("broker unreachable: no snapshot at shutdown (the last "
                            "checkpoint stands; a restarted worker replays from there)")
                return
            await self.snapshot(list(engine.partitions), timeout=SHUTDOWN_FLUSH_S)
            await asyncio.get_running_loop().run_in_executor(None, producer.flush,
                                                             SHUTDOWN_FLUSH_S)

    def _wire_timers(self) -> None:
        @self.app.timer(interval=self.settings.snapshot_every_seconds)
        async def snapshot_timer() -> None:
            self._loop = asyncio.get_running_loop()
            if self.watch.lost:  # nothing could be acknowledged: wait for the broker
                return
            await self.snapshot(list(self.engine.partitions))
            if self.models is not None:  # new global versions, for later cold starts
                await asyncio.get_running_loop().run_in_executor(None, self.models.refresh, 0)

        @self.app.timer(interval=1.0)
        async def recovery_watch() -> None:
            await self.reseek_stuck()

        if self.engine.trees is not None:
            @self.app.timer(interval=1.0)
            async def global_trees() -> None:
                await refit_trees(self.engine, self._fits)

    def _broker_back(self, lost_log: bool) -> None:
        """The broker answers again (called from the watch's thread). Partitions whose
        log it lost (topic gone, or its end now below what was processed: offsets start
        from 0 again) keep every model and start again at offset 0 of the new log."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        held = {p: s.processed for p, s in list(self.engine.partitions.items())}
        lost = [p for p, processed in held.items()
                if lost_log or self._log_end(p) <= processed]
        if not lost:
            return
        fut = asyncio.run_coroutine_threadsafe(self._rebase(lost), loop)
        try:
            fut.result(10)
        except Exception as e:
            log.error("could not restart partitions at the new log's start: %s", e)

    def _log_end(self, partition: int) -> int:
        """The telemetry partition's end offset now (-1: the topic is not there)."""
        try:
            return int(self.runtime.watermarks(self.telemetry.get_topic_name(), [partition],
                                               timeout=3)[partition][1])
        except Exception:
            return -1

    async def _rebase(self, partitions: list[int]) -> None:
        topic = self.telemetry.get_topic_name()
        for p in partitions:
            self.engine.rebase(p)
            self.engine.partitions[p].expect(0)
            try:
                await self.app.consumer.seek(TP(topic, p), 0)
            except Exception as e:  # not assigned right now: the assignment seeks
                log.debug("seek p%d to 0: %s", p, e)
        log.warning("the broker lost the telemetry log of partitions %s: they start again "
                    "at offset 0, every model kept", partitions)

    async def readopt(self, partitions: list[int]) -> None:
        """Partitions revoked during an outage and assigned back: keep their models and
        continue after the last processed offset, or from 0 if the broker lost the log."""
        loop = asyncio.get_running_loop()
        topic = self.telemetry.get_topic_name()
        rebased, resumed = [], []
        for p in partitions:
            state = self.engine.partitions[p]
            end = await loop.run_in_executor(None, self._log_end, p)
            if end <= state.processed:
                self.engine.rebase(p)
                rebased.append(p)
                self.engine.partitions[p].expect(0)
                await self.app.consumer.seek(TP(topic, p), 0)
            else:
                resumed.append(p)
                state.expect(state.processed + 1)
                await self.app.consumer.seek(TP(topic, p), state.processed + 1)
        self.engine.treelog.share_current(partitions)  # refitted while they were parked
        models = sum(len(self.engine.partitions[p].models) for p in partitions)
        log.warning("partitions %s back after the outage, %d models kept: %s", partitions,
                    models, f"the broker lost the log of {rebased}, starting again at offset 0"
                    if rebased else "resuming after the last processed offset")

    async def reseek_stuck(self) -> None:
        await reseek_stuck(self.app.consumer, self.telemetry.get_topic_name(), self.engine)

    async def recover(self, partitions: list[int]) -> None:
        """Restore models from snapshots and seek each partition to its resume offset."""
        loop = asyncio.get_running_loop()
        snapshots, starts = await loop.run_in_executor(
            None, read_snapshots, self.runtime, self.codec, partitions
        )
        for p in partitions:
            resume = self.engine.restore(p, snapshots[p], starts[p])
            n = len(self.engine.partitions[p].models)
            log.info("partition %d: %d models restored, resuming at offset %d", p, n, resume)
            await self.app.consumer.seek(TP(self.telemetry.get_topic_name(), p), resume)

    async def snapshot(self, partitions: Iterable[int], timeout: float = 30.0) -> int:
        """One snapshot round for ``partitions``; returns how many models were written.

        Models are pickled SNAPSHOT_CHUNK at a time with a short pause in between: a round
        of hundreds of models at once would stall scoring (and load the broker) in a burst.
        """
        async with self._snapshot_lock:
            loop = asyncio.get_running_loop()
            producer = self.outputs.producer
            rounds = [r for r in (self.engine.begin_snapshot(p) for p in partitions) if r]
            written = 0
            for (endpoints, checkpoint) in rounds:
                for i, endpoint in enumerate(endpoints):
                    trees = self.engine.treelog.record(checkpoint.partition, endpoint)
                    if trees is not None:
                        self._produce_snapshot(trees)
                    record = self.engine.snapshot_record(checkpoint.partition, endpoint)
                    if record is not None:
                        self._produce_snapshot(record)
                        written += 1
                    if i % SNAPSHOT_CHUNK == SNAPSHOT_CHUNK - 1:
                        await asyncio.sleep(SNAPSHOT_PAUSE)
            # Checkpoints only once every model of the round is acknowledged.
            left = await loop.run_in_executor(None, producer.flush, timeout)
            self._round_ok = not left
            if left:
                if not self.watch.lost:  # a lost broker is reported by the watch
                    log.error("snapshot round not acknowledged (%d left): no checkpoint",
                              left)
                return written
            for _, checkpoint in rounds:
                self._produce_snapshot(checkpoint)
                for tombstone in self.engine.treelog.unused(checkpoint.partition):
                    self._produce_snapshot(tombstone)
            await loop.run_in_executor(None, producer.flush, timeout)
            self.last_snapshot = time.monotonic()
            return written

    def _warm_start(self, model: EndpointModel) -> None:
        """A new endpoint begins from the latest global model of its family, if any."""

        latest = self.models.latest(family_of(model.forecaster))
        if latest is not None:
            model.forecaster = warm_start(model.forecaster, latest)

    def _produce_snapshot(self, r: SnapshotRecord) -> None:
        value = None if r.value is None else self.codec.encode("ModelSnapshot", r.value)
        self.outputs.producer.produce(self.outputs.snapshots, value, r.key.encode(),
                                      partition=r.partition)


async def reseek_stuck(consumer: Any, topic: str, engine: Engine) -> None:
    """Seek again where a partition in recovery waits for a record Faust will drop.

    Records fetched before a seek can still reach the stream after it; Faust marks each as
    read, and then drops every record at or below that offset as a duplicate, including
    the one the engine waits for (a partition would wait forever: seen under load after a
    restart). Seeking resets Faust's read offset (``consumer._read_offset``).
    """
    read = getattr(consumer, "_read_offset", None)  # faust.transport.Consumer
    if read is None:
        return
    for p, state in list(engine.partitions.items()):
        if not state.recovering or state.resume < 0:
            continue
        tp = TP(topic, p)
        at = read.get(tp)
        if at is not None and at > state.resume:
            log.info("partition %d: records up to %d were fetched before the seek to %d; "
                     "seeking again", p, at, state.resume)
            await consumer.seek(tp, state.resume)


def run_worker(kafka: KafkaSettings, settings: ProcessorSettings, loglevel: str = "warn") -> None:
    """Run the worker until SIGTERM/SIGINT (Faust's worker handles the signals)."""
    serve_metrics(settings.metrics_port)
    worker = Worker(kafka, settings)
    REGISTRY.register(EngineMetrics(worker))
    warm_up()  # the forecasters' compiled loops: now, not on the first records
    # Models are long-lived object graphs: full collections over them were the latency
    # tail. Freeze what start-up allocated and collect the young generation less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    BoundedWorker(worker.app, loglevel=loglevel, quiet=True,
                  loop=_loop(settings.uvloop)).execute_from_commandline()


class BoundedWorker(faust.Worker):
    """Faust's worker, but a signal ends the process within :data:`STOP_WITHIN_S`
    seconds in any state (a lost broker made Faust's shutdown wait for over a minute)."""

    def _schedule_shutdown(self, signal: signal.Signals) -> None:
        if not self._signal_stop_time:
            threading.excepthook = _thread_ended_in_shutdown
            threading.Thread(target=_exit_after, args=(STOP_WITHIN_S,), name="stop-watchdog",
                             daemon=True).start()
        super()._schedule_shutdown(signal)


def _thread_ended_in_shutdown(args: threading.ExceptHookArgs) -> None:
    """During shutdown with the broker gone, aiokafka's fetcher thread ends in a cancelled
    request; Faust sends stderr to the log line by line (a 100-line traceback per thread).
    One line says it."""
    name = args.thread.name if args.thread is not None else "?"
    log.warning("thread %s ended during shutdown: %s: %s", name,
                getattr(args.exc_type, "__name__", args.exc_type), args.exc_value)


def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    log.error("shutdown did not finish within %.0f s of the signal: exiting now (the last "
              "snapshot checkpoint stands)", seconds)
    logging.shutdown()
    os._exit(1)


def _loop(use_uvloop: bool) -> Any:
    if use_uvloop:
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return None
