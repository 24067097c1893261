"""A swarm worker: takes tasks from the ``tasks`` topic, runs the handler, heartbeats while
it runs, and publishes the result and the status.

Workers of one set of task types share a consumer group on ``tasks``. A worker commits a
partition's offset only up to the oldest task it still runs, so the tasks of a worker that
dies before it said RUNNING are delivered again to another one after the group's session
timeout. Once RUNNING, the task is held by a lease: the worker repeats its RUNNING status
every third of the task's ``lease_ms``; the API's lease keeper retries the task (attempt +
1) when that stops. A handler that raises fails the attempt: the worker queues the next one
or, at ``max_attempts``, fails the task with the exception as the reason.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import Counter

from processors.tasking import committable, next_attempt
from schemas.codec import Codec, CodecError
from streams.kafka.runtime import KafkaRuntime
from streams.swarm.handlers import Handler, TaskInput, run_handler
from streams.swarm.settings import SwarmSettings

log = logging.getLogger(__name__)

ATTEMPTS = Counter("loadcast_swarm_attempts_total", "Task attempts a worker finished",
                   ["task_type", "outcome"])

_STATUS_FIELDS = ("task_id", "task_type", "attempt", "max_attempts", "submitted_at",
                  "idempotency_key", "request_hash")


@dataclass
class Running:
    """A task this worker runs: its record, where it came from, its handler call."""

    task: dict[str, Any]
    partition: int
    offset: int
    future: Future[Any]
    started_at: int
    beat_at: float


def group_id(settings: SwarmSettings, topic_prefix: str = "loadcast.") -> str:
    """The consumer group of a worker pool: one per set of task types served (and per
    topic prefix: pools of two loadcast installations on one cluster stay apart)."""
    types = "+".join(sorted(set(settings.task_types))) or "all"
    return f"{topic_prefix}{settings.group_prefix}.{types}"


class SwarmWorker:
    """One worker process's loop (:meth:`run` until ``stop``)."""

    def __init__(self, rt: KafkaRuntime, codec: Codec, settings: SwarmSettings,
                 handler: Handler, *, worker_id: str | None = None,
                 session_timeout_ms: int = 6000) -> None:
        self.rt = rt
        self.codec = codec
        self.settings = settings
        self.handler = handler
        self.id = worker_id or settings.worker_id or (
            f"swarm-{socket.gethostname()}-{os.getpid()}")
        self.types = frozenset(settings.task_types)
        self.topic = rt.topic("tasks")
        self.topics = {"Task": self.topic, "TaskStatus": rt.topic("task-status"),
                       "TaskResult": rt.topic("task-results")}
        overrides: dict[str, Any] = {
            "enable.auto.commit": False, "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": max(100, session_timeout_ms // 6),
            "max.poll.interval.ms": 24 * 3600 * 1000,  # handlers may run long
            # Brokers that answer a fetch only at its max wait (Tansu) would add that much
            # to every task's start.
            "fetch.wait.max.ms": 10}
        self.consumer = rt.consumer(group_id(settings, rt.settings.topic_prefix), **overrides)
        self.consumer.subscribe([self.topic], on_revoke=self._revoked)
        self.producer = rt.record_producer(self.id, linger_ms=2.0)
        self.dead = rt.dead_letter(self.producer, client=self.id)
        self.pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="handler")
        self.running: dict[tuple[int, int], Running] = {}
        self._next: dict[int, int] = {}  # partition -> next offset to read
        self._committed: dict[int, int] = {}
        self.done = 0

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event, drain_s: float = 30.0) -> None:
        """Take and run tasks until ``stop``; then finish what runs (up to ``drain_s``)."""
        try:
            while not stop.is_set():
                self.step()
            deadline = time.monotonic() + drain_s
            while self.running and time.monotonic() < deadline:
                self._finish_done()
                self._heartbeat()
                self.producer.poll(0.05)
            self._commit()
        finally:
            self.close()

    def step(self) -> None:
        """One round: take what fits, finish what is done, heartbeat, commit."""
        free = self.settings.concurrency - len(self.running)
        if free > 0:
            # Idle: wait for tasks. Busy: only look, then wait for a handler to finish, so
            # neither a new task nor a finished one waits for the other's timeout.
            for m in self.consumer.consume(free, 0.0 if self.running else 0.05):
                self._take(m)
        if self.running:
            wait([r.future for r in self.running.values()], 0.01, FIRST_COMPLETED)
        self._finish_done()
        self._heartbeat()
        self.producer.poll(0)
        self._commit()

    def _take(self, m: Message) -> None:
        err = m.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("reading %s: %s", self.topic, err)
            return
        part, offset = m.partition() or 0, m.offset() or 0
        self._next[part] = offset + 1
        value = m.value()
        try:
            task = self.codec.decode(value or b"", "Task")
        except CodecError as e:
            self.dead.send(m.key(), value, reason=e.reason, detail=e.detail,
                           source_topic=self.topic, partition=part, offset=offset)
            return
        if self.types and task["task_type"] not in self.types:
            return  # another pool's type
        started = _now_ms()
        self._status(task, "RUNNING", started_at=started)
        fut = self.pool.submit(run_handler, self.handler, TaskInput.from_record(task))
        self.running[(part, offset)] = Running(task, part, offset, fut, started,
                                               time.monotonic())

    def _finish_done(self) -> None:
        for key, r in list(self.running.items()):
            if r.future.done():
                del self.running[key]
                self._finish(r)

    def _finish(self, r: Running) -> None:
        task, ttype = r.task, r.task["task_type"]
        exc = r.future.exception()
        if exc is None:
            try:
                self._succeed(r, r.future.result())
                ATTEMPTS.labels(ttype, "succeeded").inc()
                self.done += 1
                return
            except (TypeError, ValueError, OSError) as e:
                exc = e
        ATTEMPTS.labels(ttype, "failed").inc()
        reason = f"{type(exc).__name__}: {exc}"[:1000]
        nxt, status = next_attempt(task, reason, _now_ms(), self.id)
        if nxt is not None:
            self._produce("Task", nxt)
        self._produce("TaskStatus", status | {"worker": self.id, "started_at": r.started_at})
        self.done += 1

    def _succeed(self, r: Running, output: Any) -> None:
        text = json.dumps(output)
        size = len(text.encode())
        ref = None
        if size > self.settings.max_inline_result_bytes:
            ref = self._store_large(r.task, text)
            text = ""
        at = _now_ms()
        self._produce("TaskResult", {
            "task_id": r.task["task_id"], "task_type": r.task["task_type"],
            "attempt": r.task["attempt"], "worker": self.id, "at": at,
            "started_at": r.started_at, "output": text, "output_ref": ref,
            "output_bytes": size})
        self._status(r.task, "SUCCEEDED", started_at=r.started_at, at=at)

    def _store_large(self, task: dict[str, Any], text: str) -> str:
        if not self.settings.result_dir:
            raise ValueError(f"result of {len(text.encode())} bytes is over "
                             f"swarm.max_inline_result_bytes and swarm.result_dir is not set")
        data = text.encode()
        path = Path(self.settings.result_dir) / f"{sha256(data).hexdigest()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path.resolve().as_uri()

    def _heartbeat(self) -> None:
        now = time.monotonic()
        for r in self.running.values():
            if now - r.beat_at >= r.task["lease_ms"] / 3000:
                r.beat_at = now
                self._status(r.task, "RUNNING", started_at=r.started_at)

    # ------------------------------------------------------------------ Kafka

    def _status(self, task: dict[str, Any], state: str, *, started_at: int | None,
                at: int | None = None, reason: str = "") -> None:
        rec = {k: task.get(k) for k in _STATUS_FIELDS}
        rec |= {"state": state, "at": at or _now_ms(), "started_at": started_at,
                "worker": self.id, "reason": reason, "source": self.id}
        self._produce("TaskStatus", rec)

    def _produce(self, schema: str, record: dict[str, Any]) -> None:
        value = self.codec.encode(schema, record)
        while not self.producer.produce(self.topics[schema], value, record["task_id"].encode()):
            self.producer.poll(0.1)  # full: wait for the broker rather than lose a status

    def _commit(self) -> None:
        by_part: dict[int, list[int]] = {}
        for part, offset in self.running:
            by_part.setdefault(part, []).append(offset)
        offsets = []
        for part, nxt in self._next.items():
            at = committable(by_part.get(part, ()), nxt)
            if self._committed.get(part) != at:
                self._committed[part] = at
                offsets.append(TopicPartition(self.topic, part, at))
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            except KafkaException as e:  # e.g. partitions revoked meanwhile
                log.info("commit of %s skipped: %s", offsets, e)

    def _revoked(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # What is still running of these partitions goes on here (and is not committed):
        # their next owner runs them again, at least once.
        for tp in partitions:
            self._next.pop(tp.partition, None)
            self._committed.pop(tp.partition, None)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.producer.flush(10.0)
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as e:
            log.info("consumer close: %s", e)


def _now_ms() -> int:
    return int(time.time() * 1000)
