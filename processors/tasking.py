"""The task state machine of the task API and its swarm: values in, values out.

A task's visible state is a fold of its :class:`TaskStatus` records (topic ``task-status``,
compacted, keyed by task id) in log order. Every API replica folds the same log, so every
replica shows the same state, and a restarted one rebuilds it. The rules (:func:`fold`):

- a finished task (succeeded, failed, cancelled) never changes again: its result is
  recorded once, whatever arrives later;
- a record of an older attempt than the task's is stale (a presumed-dead worker that
  came back): ignored;
- within one attempt a record counts when it is not behind (queued < running <
  finished); a repeated running record is the worker's heartbeat.

Retries are new attempts: a worker whose handler raised, or the lease keeper that saw a
running attempt stop heartbeating, writes attempt + 1 (queued) or, at ``max_attempts``,
the failure with its reason (:func:`next_attempt`).

>>> s = fold(None, status("t1", "QUEUED", 1)).state
>>> s = fold(s, status("t1", "RUNNING", 1, worker="w1")).state
>>> r = fold(s, status("t1", "RUNNING", 2, worker="w2"))
>>> r.accepted, r.state.worker
(True, 'w2')
>>> late = fold(r.state, status("t1", "SUCCEEDED", 1, worker="w1"))
>>> late.accepted, late.stale, late.state.state
(False, True, 'RUNNING')
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
_RANK = {"QUEUED": 0, "RUNNING": 1, "SUCCEEDED": 2, "FAILED": 2, "CANCELLED": 2}


class TaskView(NamedTuple):
    """A task as the latest accepted status record says (plus what the fold kept).

    A named tuple, immutable: the API builds one per status record it reads, and a
    tuple is made in a fifth of the time of a frozen dataclass."""

    task_id: str
    task_type: str
    state: str
    attempt: int
    max_attempts: int
    at: int
    submitted_at: int
    started_at: int | None = None
    worker: str | None = None
    reason: str = ""
    source: str = ""
    idempotency_key: str | None = None
    request_hash: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    def record(self) -> dict[str, Any]:
        """The TaskStatus record of this state (to write it again, e.g. re-assert it)."""
        return self._asdict()


def status(task_id: str, state: str, attempt: int, *, task_type: str = "echo",
           max_attempts: int = 3, at: int = 0, submitted_at: int = 0,
           worker: str | None = None, **more: Any) -> dict[str, Any]:
    """A TaskStatus record (defaults for tests and examples)."""
    rec = {"task_id": task_id, "task_type": task_type, "state": state, "attempt": attempt,
           "max_attempts": max_attempts, "at": at, "submitted_at": submitted_at,
           "started_at": None, "worker": worker, "reason": "", "source": "",
           "idempotency_key": None, "request_hash": None}
    rec.update(more)
    return rec


def view(record: Mapping[str, Any]) -> TaskView:
    """The :class:`TaskView` of one TaskStatus record."""
    g = record.get
    return TaskView(record["task_id"], record["task_type"], record["state"],
                    record["attempt"], record["max_attempts"], record["at"],
                    record["submitted_at"], g("started_at"), g("worker"), g("reason", ""),
                    g("source", ""), g("idempotency_key"), g("request_hash"))


class FoldResult(NamedTuple):
    """What one status record did: the task's state after it, whether it counted, and
    whether it was stale (behind the task: an older attempt, or after it finished)."""

    state: TaskView
    accepted: bool
    stale: bool
    heartbeat: bool = False  # a running record of the running attempt (lease renewed)


def fold(current: TaskView | None, record: Mapping[str, Any]) -> FoldResult:
    """Apply one TaskStatus record to a task's state (None: first record of the task)."""
    new = view(record)
    if current is None:
        return FoldResult(new, True, False)
    if current.finished:
        same = new.state == current.state and new.attempt == current.attempt
        return FoldResult(current, False, not same)
    if new.attempt < current.attempt:
        return FoldResult(current, False, True)
    if new.attempt == current.attempt:
        if new.state == "CANCELLED":  # cancel wins over any unfinished state
            return FoldResult(_keep_identity(current, new), True, False)
        if _RANK[new.state] < _RANK[current.state]:
            return FoldResult(current, False, True)
        if new.state == current.state == "QUEUED":
            return FoldResult(current, False, False)  # our own record read back
        if new.state == current.state == "RUNNING" and new.worker != current.worker:
            # A second worker runs the same attempt (a duplicate delivery): the first one
            # holds the lease; the other's result may still count if it finishes first.
            return FoldResult(current, False, False)
        beat = new.state == current.state == "RUNNING"
        return FoldResult(_keep_identity(current, new), True, False, heartbeat=beat)
    return FoldResult(_keep_identity(current, new), True, False)


def _keep_identity(current: TaskView, new: TaskView) -> TaskView:
    """``new``, keeping what only the submitting record is sure to carry."""
    started = new.started_at if new.started_at is not None else (
        current.started_at if new.attempt == current.attempt else None)
    if (new.submitted_at or not current.submitted_at) and started == new.started_at and (
            new.idempotency_key or not current.idempotency_key) and (
            new.request_hash or not current.request_hash):
        return new  # the usual case: nothing to keep (and no copy to make)
    return new._replace(
        submitted_at=new.submitted_at or current.submitted_at,
        idempotency_key=new.idempotency_key or current.idempotency_key,
        request_hash=new.request_hash or current.request_hash,
        started_at=started,
    )


# --------------------------------------------------------------------------- retries


def next_attempt(task: Mapping[str, Any], reason: str, now_ms: int,
                 source: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """After attempt ``task["attempt"]`` failed for ``reason``: ``(Task record of the next
    attempt, its QUEUED status)``, or ``(None, FAILED status)`` at ``max_attempts``.

    ``task`` is a Task record (or anything with its fields).

    >>> t = {"task_id": "t", "task_type": "echo", "attempt": 3, "max_attempts": 3,
    ...      "submitted_at": 5, "description": "", "lease_ms": 1000}
    >>> nxt, st = next_attempt(t, "boom", 9, "w1")
    >>> nxt, st["state"], st["reason"]
    (None, 'FAILED', 'attempt 3 of 3 failed: boom')
    """
    attempt, max_attempts = int(task["attempt"]), int(task["max_attempts"])
    common = {k: task.get(k) for k in ("task_id", "task_type", "max_attempts", "submitted_at",
                                       "idempotency_key", "request_hash")}
    if attempt >= max_attempts:
        failed = {**common, "state": "FAILED", "attempt": attempt, "at": now_ms,
                  "started_at": None, "worker": None, "source": source,
                  "reason": f"attempt {attempt} of {max_attempts} failed: {reason}"}
        return None, failed
    nxt = {**dict(task), "attempt": attempt + 1, "enqueued_at": now_ms}
    queued = {**common, "state": "QUEUED", "attempt": attempt + 1, "at": now_ms,
              "started_at": None, "worker": None, "source": source,
              "reason": f"attempt {attempt} failed: {reason}"}
    return nxt, queued


def expired_leases(running: Iterable[tuple[str, float]], now: float,
                   lease_s: float) -> list[str]:
    """Ids of running tasks whose last heartbeat (``(task_id, seen_at)``, seconds on one
    clock) is older than the lease.

    >>> expired_leases([("a", 0.0), ("b", 9.0)], now=10.0, lease_s=5.0)
    ['a']
    """
    return [tid for tid, seen in running if now - seen > lease_s]


# --------------------------------------------------------------------------- idempotency


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_hash(body: Mapping[str, Any]) -> str:
    """A fingerprint of a request body, the same for the same JSON whatever its key order.

    >>> request_hash({"a": 1, "b": [2]}) == request_hash({"b": [2], "a": 1})
    True
    """
    return hashlib.sha256(_CANONICAL.encode(body).encode()).hexdigest()


def idempotent_match(known: tuple[str, str] | None, body_hash: str) -> str | None:
    """For an Idempotency-Key already seen as ``(task_id, request_hash)``: the task id when
    the body is the same; None for a new key; ``ValueError`` (409) for another body.

    >>> idempotent_match(None, "h"), idempotent_match(("t1", "h"), "h")
    (None, 't1')
    """
    if known is None:
        return None
    task_id, seen_hash = known
    if seen_hash != body_hash:
        raise ValueError(f"Idempotency-Key already used for task {task_id} with another body")
    return task_id


# --------------------------------------------------------------------------- offsets


def committable(in_flight: Iterable[int], next_offset: int) -> int:
    """The offset a worker may commit on a partition: the oldest task it still runs (so a
    dead worker's unfinished tasks are delivered again), else the next one to read.

    >>> committable([7, 5], 9), committable([], 9)
    (5, 9)
    """
    return min(in_flight, default=next_offset)


# --------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Estimate:
    """Where a queued task stands: tasks ahead of it, and when it should start."""

    queue_position: int
    predicted_start_ms: int | None


def estimate_start(position: int, throughput_per_s: float | None, now_ms: int) -> Estimate:
    """Queue position (0 = next) and predicted start from the swarm's measured throughput
    (tasks finished per second of this type); no throughput measured: no prediction.

    >>> estimate_start(10, 5.0, 1000)
    Estimate(queue_position=10, predicted_start_ms=3000)
    """
    if not throughput_per_s or throughput_per_s <= 0 or not math.isfinite(throughput_per_s):
        return Estimate(position, None)
    return Estimate(position, now_ms + round(1000 * position / throughput_per_s))


def workers_needed(arrival_per_s: float, service_s: float, utilization: float = 0.8) -> int:
    """Workers to keep up with ``arrival_per_s`` tasks a second taking ``service_s`` each,
    each worker busy at most ``utilization`` of the time (Little's law: busy workers =
    arrival rate x service time).

    >>> workers_needed(10.0, 2.0), workers_needed(0.0, 2.0)
    (25, 0)
    """
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], not {utilization}")
    busy = max(0.0, arrival_per_s) * max(0.0, service_s)
    return math.ceil(busy / utilization - 1e-9)
