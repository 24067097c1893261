"""The task service: the book, the writer, the follower and the lease keeper together.

:class:`TaskService` is what the HTTP handlers (:mod:`streams.tasks.app`) call. It runs on
one event loop: submit and cancel write to Kafka and fold their own records at once (a
client reads its own write), and everything read back from task-status is folded again
(idempotent). The lease keeper retries running attempts whose worker stopped
heartbeating; several API replicas may run it at once (a retry names its attempt, so two
keepers' retries of one attempt are the same attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from processors.tasking import TaskView, idempotent_match, next_attempt, request_hash
from schemas.codec import Codec
from streams.kafka.runtime import KafkaRuntime
from streams.sdk import TelemetryProducer
from streams.tasks.book import TaskBook
from streams.tasks.demand import DemandTelemetry
from streams.tasks.log import Batch, StatusFollower, TaskWriter, now_ms
from streams.tasks.settings import TaskSettings

log = logging.getLogger(__name__)

SUBMITTED = Counter("loadcast_tasks_submitted_total", "Tasks accepted by the API", ["task_type"])
RETRIED = Counter("loadcast_tasks_lease_expired_total",
                  "Running attempts whose lease expired (retried or failed)", ["task_type"])
REASSERTED = Counter("loadcast_tasks_status_reasserted_total",
                     "Statuses written again after a stale record (compaction keeps the latest)")


class IdempotencyConflict(ValueError):
    """The Idempotency-Key was used for another body (HTTP 409)."""


@dataclass(frozen=True)
class Submitted:
    """A submitted task: its Task record and whether it is new (False: the same key and
    body were submitted before and this is that task)."""

    task: dict[str, Any]
    view: TaskView
    created: bool


class TaskService:
    """Submit, look up, cancel, and keep leases, over Kafka."""

    def __init__(self, rt: KafkaRuntime, codec: Codec, settings: TaskSettings,
                 client_id: str = "loadcast-tasks") -> None:
        self.rt = rt
        self.codec = codec
        self.settings = settings
        self.client_id = client_id
        self.book = TaskBook(settings.forecast_window_seconds)
        self.writer: TaskWriter | None = None
        self.follower: StatusFollower | None = None
        # Task records this process submitted and that are unfinished: the keeper retries
        # from them without reading the tasks topic (other replicas' tasks: it reads it).
        self.records: dict[str, dict[str, Any]] = {}
        self._ids = task_ids()
        self._lease_ms = round(settings.lease_seconds * 1000)
        self._submitted: dict[str, Any] = {}  # task type -> its child of SUBMITTED
        self._retrying: dict[str, int] = {}  # task -> attempt whose retry was written
        self.live = False  # caught up with task-status: re-asserting is safe from now on
        self._keeper: asyncio.Task[None] | None = None
        self.demand = DemandTelemetry(settings.telemetry_region)
        self._telemetry: TelemetryProducer | None = None
        self._publisher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ life cycle

    async def start(self, catch_up_timeout: float = 60.0) -> None:
        """Read task-status and task-results to their end, then follow them and keep
        leases."""
        loop = asyncio.get_running_loop()
        self.writer = TaskWriter(self.rt, self.codec, self.client_id)
        publish = self.settings.telemetry_interval_seconds > 0
        self.follower = StatusFollower(self.rt, self.codec, loop, self._deliver,
                                       skip_writer=self.writer.nonce, scores=publish)
        self.follower.start()
        deadline = time.monotonic() + catch_up_timeout
        while not self.follower.caught_up.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"task-status not read to its end in {catch_up_timeout}s")
            await asyncio.sleep(0.02)
        self.live = True
        self._keeper = asyncio.create_task(self._keep_leases())
        if publish:
            self._telemetry = TelemetryProducer(self.rt.settings, client_id=self.client_id,
                                                codec=self.codec)
            self._publisher = asyncio.create_task(self._publish_demand())

    async def stop(self) -> None:
        for task in (self._keeper, self._publisher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._telemetry is not None:
            await asyncio.to_thread(self._telemetry.flush, 10.0)
        if self.follower is not None:
            await asyncio.to_thread(self.follower.close)
        if self.writer is not None:
            await self.writer.aclose()

    def _deliver(self, batch: Batch) -> None:
        now = time.monotonic()
        for schema, record in batch:
            if schema == "TaskResult":
                self.book.apply_result(record)
                continue
            if schema == "LoadScore":
                self.demand.score(record)
                continue
            r = self.book.apply_status(record, now)
            if r.accepted and r.state.finished:
                self.records.pop(r.state.task_id, None)
            if r.stale and self.live:
                # A late record of a presumed-dead attempt is now the newest of its key:
                # compaction would keep it. Write the task's real state after it.
                REASSERTED.inc()
                self._write_status(r.state.record() | {"at": now_ms(), "source": "api"})

    # ------------------------------------------------------------------ operations

    async def submit(self, body: dict[str, Any], idempotency_key: str | None) -> Submitted:
        """Queue a validated request body (``task_type``, ``description``,
        ``requirements``); :class:`IdempotencyConflict` when the key was used for another
        body."""
        digest = request_hash(body) if idempotency_key else None
        if idempotency_key and digest:
            try:
                known = idempotent_match(self.book.idempotency(idempotency_key), digest)
            except ValueError as e:
                raise IdempotencyConflict(str(e)) from None
            if known is not None and known in self.book.tasks:
                return Submitted({"task_id": known, **body}, self.book.tasks[known], False)
        t, tid, task_type = now_ms(), next(self._ids), body["task_type"]
        max_attempts = self.settings.max_attempts
        task = {
            "task_id": tid, "task_type": task_type,
            "description": body["description"], "requirements": body["requirements_json"],
            "attempt": 1, "max_attempts": max_attempts, "lease_ms": self._lease_ms,
            "submitted_at": t, "enqueued_at": t, "idempotency_key": idempotency_key,
            "request_hash": digest,
        }
        queued = {"task_id": tid, "task_type": task_type, "state": "QUEUED", "attempt": 1,
                  "max_attempts": max_attempts, "at": t, "submitted_at": t,
                  "started_at": None, "worker": None, "reason": "", "source": "api",
                  "idempotency_key": idempotency_key, "request_hash": digest}
        # Applied at once (the key is taken from now on; the client may ask at once): the
        # first record of a new id, so nothing in the log can come before it that matters.
        # This process skips it when it reads it back.
        self.book.apply_status(queued, time.monotonic())
        assert self.writer is not None
        try:
            await self.writer.send_all([("TaskStatus", queued, True), ("Task", task, False)])
        except (BufferError, RuntimeError):
            # Not in Kafka (or not known to be): not accepted (503), and forgotten here. A
            # status that got there without its task stays queued for other replicas and
            # after a restart, where a cancel ends it.
            self.book.forget(task["task_id"])
            raise
        self.demand.arrived(task_type)
        view = self.book.tasks[tid]
        if not view.finished:
            self.records[tid] = task
        submitted = self._submitted.get(task_type)
        if submitted is None:  # the labelled child, looked up once per type
            submitted = self._submitted[task_type] = SUBMITTED.labels(task_type)
        submitted.inc()
        return Submitted(task, view, True)

    async def cancel(self, task_id: str, timeout: float = 10.0) -> TaskView:
        """Cancel an unfinished task (KeyError: unknown). The CANCELLED status is not
        applied here but read back from task-status like every replica reads it, so the
        answer is what the log decided: a worker's result that got there first wins, and
        the task is returned succeeded."""
        task = self.book.tasks[task_id]
        if task.finished:
            return task
        rec = task.record() | {"state": "CANCELLED", "at": now_ms(), "source": "api",
                               "reason": "cancelled by the client"}
        assert self.writer is not None
        await self.writer.send("TaskStatus", rec)
        deadline = time.monotonic() + timeout
        while not self.book.tasks[task_id].finished and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return self.book.tasks[task_id]

    # ------------------------------------------------------------------ demand

    async def _publish_demand(self) -> None:
        assert self._telemetry is not None
        while True:
            await asyncio.sleep(self.settings.telemetry_interval_seconds)
            book = self.book
            running = Tally(book.tasks[t].task_type for t in book.heartbeats)
            service = {t: st.service_s for t, st in book.stats.items()}
            for window in self.demand.windows(self.settings.task_types, service, running,
                                              now_ms()):
                self._telemetry.send(window)

    # ------------------------------------------------------------------ leases

    async def _keep_leases(self) -> None:
        lease = self.settings.lease_seconds
        period = self.settings.keeper_interval_seconds or lease / 4
        while True:
            await asyncio.sleep(period)
            try:
                await self.expire_leases()
            except Exception:  # the keeper must outlive a failed write
                log.exception("lease keeper: retrying expired leases failed")

    async def expire_leases(self) -> int:
        """Retry (or fail, at ``max_attempts``) every running attempt whose lease expired;
        returns how many."""
        expired = self.book.expired(time.monotonic(), self.settings.lease_seconds)
        # Retries are not applied here but read back (the log's order decides, as for every
        # replica); until then, a retry written is not written again.
        self._retrying = {t.task_id: t.attempt for t in expired
                          if self._retrying.get(t.task_id) == t.attempt}
        expired = [t for t in expired if t.task_id not in self._retrying]
        sends: list[Awaitable[None]] = []
        for task in expired:
            self._retrying[task.task_id] = task.attempt
            RETRIED.labels(task.task_type).inc()
            reason = (f"worker {task.worker} stopped heartbeating "
                      f"(lease {self.settings.lease_seconds:g}s)")
            record = task.record() | {"lease_ms": round(self.settings.lease_seconds * 1000)}
            nxt, st = next_attempt(record, reason, now_ms(), "keeper")
            sends.append(self._write_status(st))
            if nxt is not None:
                sends.append(self._requeue(task, nxt))
            log.info("task %s attempt %d: %s", task.task_id, task.attempt, reason)
        await asyncio.gather(*sends)
        return len(expired)

    async def _requeue(self, task: TaskView, nxt: dict[str, Any]) -> None:
        """The next attempt's Task record: description and requirements come from the
        tasks topic (the status does not carry them), so the keeper reads its record."""
        original = self.records.get(task.task_id)
        if original is None:
            original = await asyncio.to_thread(self._find_task, task.task_id)
        if original is None:
            log.error("task %s: its Task record is gone from the tasks topic; failing it",
                      task.task_id)
            rec = task.record() | {"state": "FAILED", "at": now_ms(), "source": "keeper",
                                   "reason": "lease expired and the task record is gone"}
            await self._write_status(rec)
            return
        assert self.writer is not None
        await self.writer.send("Task", original | {k: nxt[k] for k in (
            "attempt", "enqueued_at", "lease_ms")})

    def _find_task(self, task_id: str) -> dict[str, Any] | None:
        return find_task(self.rt, self.codec, task_id)

    def _write_status(self, record: dict[str, Any]) -> asyncio.Future[None]:
        assert self.writer is not None
        return self.writer.send("TaskStatus", record)


def task_ids(batch: int = 1024) -> Iterator[str]:
    """Random 128-bit task ids in hex (as ``uuid4().hex`` but drawn from the OS 1,024 at a
    time: a system call per id was a tenth of a submit's cost)."""
    while True:
        data = os.urandom(16 * batch)
        for i in range(0, len(data), 16):
            yield data[i:i + 16].hex()


def find_task(rt: KafkaRuntime, codec: Codec, task_id: str,
              timeout: float = 30.0) -> dict[str, Any] | None:
    """The first Task record of ``task_id`` on the tasks topic (its key's partition only)."""
    from streams.kafka.partitioning import partition_for

    topic = rt.topic("tasks")
    parts = len(rt.admin().list_topics(topic, timeout=10).topics[topic].partitions)
    key = task_id.encode()
    for m in rt.read_to_end(topic, timeout=timeout, partitions=[partition_for(key, parts)]):
        value = m.value()
        if m.key() == key and value is not None:
            rec: dict[str, Any] = codec.decode(value, "Task")
            return rec
    return None
