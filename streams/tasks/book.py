"""The task API's in-memory view of every task, folded from task-status and task-results.

One :class:`TaskBook` per API process, changed only on its event loop. It is rebuilt from
the compacted task-status topic (and task-results) at start, so a restarted API, or any
replica, answers for every task. Which record counts is :func:`processors.tasking.fold`.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sortedcontainers import SortedList

from processors.tasking import (
    Estimate,
    FoldResult,
    TaskView,
    estimate_start,
    expired_leases,
    fold,
)


@dataclass
class TypeStats:
    """What the API measured of one task type over the recent window."""

    arrivals: deque[float] = field(default_factory=deque)  # submit times (monotonic)
    finishes: deque[float] = field(default_factory=deque)  # success times (monotonic)
    service_s: float | None = None  # EWMA of run times of succeeded attempts


class TaskBook:
    """Every task's state, idempotency keys, counted results, queues and rates."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.tasks: dict[str, TaskView] = {}
        self.keys: dict[str, tuple[str, str]] = {}  # Idempotency-Key -> (task id, hash)
        self.heartbeats: dict[str, float] = {}  # running task -> last heartbeat seen
        # type -> enqueue numbers of its queued tasks, sorted: a task's queue position is
        # its rank there (O(log n); scanning the queue took a sixth of the API's loop time
        # under load, when workers lagged and thousands were queued)
        self.queued: dict[str, SortedList] = defaultdict(SortedList)
        self.results: dict[str, dict[str, Any]] = {}  # task -> the result that counts
        self._pending: dict[str, dict[int, dict[str, Any]]] = {}  # task -> attempt -> result
        self.recorded: Counter[str] = Counter()  # how often a task's result was recorded
        self.stats: dict[str, TypeStats] = defaultdict(TypeStats)
        self.stale = 0  # status records ignored as stale
        self.enqueued: dict[str, int] = {}  # queued task -> its enqueue number
        self._seq = 0

    # ------------------------------------------------------------------ folding

    def apply_status(self, record: Mapping[str, Any], now: float) -> FoldResult:
        """Fold one TaskStatus record in; ``now`` is monotonic seconds."""
        tid = record["task_id"]
        before = self.tasks.get(tid)
        r = fold(before, record)
        if r.stale:
            self.stale += 1
        if not r.accepted:
            return r
        after = r.state
        self.tasks[tid] = after
        if after.idempotency_key and after.request_hash:
            self.keys.setdefault(after.idempotency_key, (tid, after.request_hash))
        if after.state == "QUEUED":
            self._dequeue(tid, after.task_type)  # a new attempt joins the end of the queue
            self._seq += 1
            self.enqueued[tid] = self._seq
            self.queued[after.task_type].add(self._seq)
            if before is None:
                self._arrived(after.task_type, now)
        else:
            self._dequeue(tid, after.task_type)
        if after.state == "RUNNING":
            # A running state the API wrote again (after a stale record) is no heartbeat:
            # only the worker renews its lease.
            if record.get("source") != "api" or tid not in self.heartbeats:
                self.heartbeats[tid] = now
        else:
            self.heartbeats.pop(tid, None)
        if after.finished:
            self._finished(after, now)
        return r

    def apply_result(self, record: Mapping[str, Any]) -> bool:
        """Keep one TaskResult; True when it is the result that counts (recorded once)."""
        tid, attempt = record["task_id"], int(record["attempt"])
        task = self.tasks.get(tid)
        if task is not None and task.finished:
            return self._count(task, dict(record))
        if task is None or attempt >= task.attempt:
            self._pending.setdefault(tid, {})[attempt] = dict(record)
        return False

    def _finished(self, task: TaskView, now: float) -> None:
        result = self._pending.pop(task.task_id, {}).get(task.attempt)
        if task.state != "SUCCEEDED":
            return
        st = self.stats[task.task_type]
        st.finishes.append(now)
        if task.started_at is not None and task.at >= task.started_at:
            run_s = (task.at - task.started_at) / 1000
            st.service_s = run_s if st.service_s is None else 0.8 * st.service_s + 0.2 * run_s
        self._trim(st.finishes, now)
        if result is not None:
            self._count(task, result)

    def _count(self, task: TaskView, record: dict[str, Any]) -> bool:
        if (task.state != "SUCCEEDED" or int(record["attempt"]) != task.attempt
                or task.task_id in self.results):
            return False
        self.results[task.task_id] = record
        self.recorded[task.task_id] += 1
        return True

    def forget(self, task_id: str) -> None:
        """Drop a task this process applied but could not write (Kafka refused it)."""
        task = self.tasks.pop(task_id, None)
        if task is None:
            return
        if task.idempotency_key and self.keys.get(task.idempotency_key, ("",))[0] == task_id:
            del self.keys[task.idempotency_key]
        self._dequeue(task_id, task.task_type)
        self.heartbeats.pop(task_id, None)

    # ------------------------------------------------------------------ questions

    def idempotency(self, key: str) -> tuple[str, str] | None:
        """``(task id, request hash)`` of an Idempotency-Key already used, else None."""
        return self.keys.get(key)

    def expired(self, now: float, lease_s: float) -> list[TaskView]:
        """Running tasks whose worker stopped heartbeating for longer than the lease."""
        ids = expired_leases(self.heartbeats.items(), now, lease_s)
        return [self.tasks[t] for t in ids]

    def estimate(self, task: TaskView, now: float, now_ms: int) -> Estimate | None:
        """Queue position and predicted start of a queued task (None when not queued)."""
        if task.state != "QUEUED":
            return None
        return estimate_start(self.position(task), self.throughput(task.task_type, now), now_ms)

    def position(self, task: TaskView) -> int:
        """Queued tasks of its type ahead of ``task`` (0 when it is not queued)."""
        seq = self.enqueued.get(task.task_id)
        return 0 if seq is None else int(self.queued[task.task_type].bisect_left(seq))

    def throughput(self, task_type: str, now: float) -> float | None:
        """Tasks of ``task_type`` finished per second over the window (None: none yet)."""
        st = self.stats.get(task_type)
        if st is None or not st.finishes:
            return None
        self._trim(st.finishes, now)
        span = min(self.window_s, max(1.0, now - st.finishes[0])) if st.finishes else 0
        return len(st.finishes) / span if span else None

    def arrival_rate(self, task_type: str, now: float) -> float:
        """Tasks of ``task_type`` submitted per second over the window."""
        st = self.stats.get(task_type)
        if st is None:
            return 0.0
        self._trim(st.arrivals, now)
        return len(st.arrivals) / self.window_s

    def counts(self) -> dict[str, int]:
        """Tasks per state."""
        return dict(Counter(t.state for t in self.tasks.values()))

    # ------------------------------------------------------------------ helpers

    def _dequeue(self, task_id: str, task_type: str) -> None:
        seq = self.enqueued.pop(task_id, None)
        if seq is not None:
            self.queued[task_type].discard(seq)

    def _arrived(self, task_type: str, now: float) -> None:
        st = self.stats[task_type]
        st.arrivals.append(now)
        self._trim(st.arrivals, now)

    def _trim(self, times: deque[float], now: float) -> None:
        while times and now - times[0] > self.window_s:
            times.popleft()
