"""The mirror executor service: each command of ``mirror-commands`` decoded, checked
(:mod:`.verify`), its bundle fetched (:mod:`.fetch`), accepted into the state file
(:mod:`.state`) and applied (:mod:`.supervise`); what happened is reported
(:mod:`.report`). See :mod:`streams.executor` for the whole story."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer
from prometheus_client import Counter

from processors.signing import Verifier
from schemas.codec import Codec, CodecError
from streams.bundles import MAX_BUNDLE_BYTES
from streams.executor.consume import next_command, open_commands
from streams.executor.fetch import BundleCache
from streams.executor.report import Reporter
from streams.executor.state import STATE_FILE, ExecutorState, now_ms
from streams.executor.supervise import Supervisor
from streams.executor.verify import Verdict, check_command, decode_command
from streams.kafka.producer import RecordProducer
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name

log = logging.getLogger(__name__)

COMMANDS = Counter("loadcast_executor_commands_total", "Mirror commands by outcome",
                   ["executor", "outcome"])


class Executor:
    """The executor of one region. :meth:`handle` is synchronous and usable without the
    consumer loop (tests, tools); :meth:`run` consumes until ``stop`` is set."""

    def __init__(
        self,
        kafka: KafkaSettings,
        codec: Codec,
        *,
        region: str,
        executor_id: str,
        verifier: Verifier,
        store_url: str,
        work_dir: Path | str,
        drain_seconds: float = 5.0,
        max_bundle_bytes: int = MAX_BUNDLE_BYTES,
        command_lookback_s: float = 600.0,
        stop_instances_on_exit: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        self.kafka = kafka
        self.codec = codec
        self.region = region
        self.id = executor_id
        self.verifier = verifier
        self.work = Path(work_dir)
        self.lookback_s = command_lookback_s
        self.stop_on_exit = stop_instances_on_exit
        self.state_path = self.work / STATE_FILE
        self.state = ExecutorState.load(self.state_path)
        self.commands_topic = topic_name(kafka, "mirror-commands")
        self.producer = RecordProducer(kafka, f"executor-{executor_id}", linger_ms=1.0)
        self.report = Reporter(self.producer, codec, executor_id, region,
                               status_topic=topic_name(kafka, "mirror-status"),
                               commands_topic=self.commands_topic,
                               dead_topic=topic_name(kafka, "dead-letter"))
        self.statuses = self.report.statuses  # everything reported (tests, inspection)
        self.bundles = BundleCache(self.work / "bundles", store_url, max_bundle_bytes)
        self._stop = threading.Event()
        self.supervisor = Supervisor(self.state, self._save, self.bundles, self.report,
                                     executor_id, region, self.work, host,
                                     drain_s=drain_seconds, stopping=self._stop)
        self.consumer: Consumer | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Adopt the instances of the state file that still run, reconcile every API to
        its last accepted command, and position the consumer."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.supervisor.adopt()
        for api in list(self.state.accepted):
            self.supervisor.reconcile(api)
        self.consumer = open_commands(self.kafka, f"executor-{self.id}", self.commands_topic,
                                      self.state.offsets, self.lookback_s)

    def run(self, stop: threading.Event | None = None) -> None:
        """Consume commands until ``stop`` (or :meth:`stop`) is set, then close."""
        stop = stop or self._stop
        if self.consumer is None:
            self.start()
        assert self.consumer is not None
        last_check = time.monotonic()
        try:
            while not stop.is_set() and not self._stop.is_set():
                msg = next_command(self.consumer, 0.2)
                if msg is not None:
                    self.handle(msg.key(), msg.value(), msg.partition() or 0,
                                msg.offset() or 0)
                self.producer.poll(0)
                if time.monotonic() - last_check > 2.0:
                    last_check = time.monotonic()
                    for api in list(self.state.accepted):
                        self.supervisor.check_instances(api)
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Close Kafka clients; stop the instances only with ``stop_instances_on_exit``."""
        if self.stop_on_exit:
            self.supervisor.stop_all()
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None
        self.producer.flush(10)

    # ----------------------------------------------------------------- commands

    def handle(self, key: bytes | None, value: bytes | None, partition: int = 0,
               offset: int = -1) -> Verdict:
        """One record of mirror-commands: decode, check, accept, apply."""
        try:
            record = decode_command(self.codec, value, self.commands_topic)
        except CodecError as e:
            self.report.dead_letter(key, value or b"", e.reason, str(e), partition, offset)
            self._advance(partition, offset)
            return Verdict("reject", f"{e.reason}: {e}")
        api = str(record["api"])
        verdict = check_command(record, region=self.region, verifier=self.verifier,
                                last=self.state.accepted.get(api), now=now_ms())
        if verdict.kind == "apply" and record["action"] == "ACTIVATE":
            verdict = self.bundles.ensure(str(record["bundle_digest"]))
        COMMANDS.labels(self.id, verdict.kind).inc()
        if verdict.kind == "apply":
            self._accept(api, record, partition, offset)
            return verdict
        if verdict.kind == "reject":
            log.warning("rejected %s %s of %s (sequence %s): %s", record["action"],
                        record["command_id"], api, record["sequence"], verdict.reason)
            self.report.status(api, record["command_id"], record["sequence"], "REJECTED",
                               digest=record["bundle_digest"] or None, reason=verdict.reason)
        elif verdict.kind == "duplicate":
            log.info("command %s delivered again: nothing to do", record["command_id"])
            for inst in self.state.instances.get(api, []):
                self.report.status(api, inst.command_id, inst.sequence, "READY",
                                   url=inst.url, digest=inst.digest,
                                   capacity=inst.capacity_rps,
                                   reason=f"duplicate of {record['command_id']}: "
                                   "already applied")
        self._advance(partition, offset)
        return verdict

    def _accept(self, api: str, record: dict[str, Any], partition: int, offset: int) -> None:
        # On disk (with the offset) before anything runs, so a crash from here on is
        # reconciled from the file after the restart.
        kept = {k: v for k, v in record.items() if k not in ("signature", "forecast")}
        self.state.accepted[api] = kept
        self.state.offsets[partition] = offset + 1
        self._save()
        log.info("accepted %s %s of %s: %s", record["action"], record["command_id"], api,
                 record["reason"])
        self.report.status(api, record["command_id"], record["sequence"], "ACCEPTED",
                           digest=record["bundle_digest"] or None, reason=str(record["reason"]))
        self.supervisor.reconcile(api)

    def _advance(self, partition: int, offset: int) -> None:
        if offset >= 0:
            self.state.offsets[partition] = offset + 1
            self._save()

    def _save(self) -> None:
        self.state.save(self.state_path)
