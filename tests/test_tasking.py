"""The task state machine (processors.tasking) and the API's book (streams.tasks.book)."""

from __future__ import annotations

import pytest

from processors.tasking import (
    committable,
    estimate_start,
    fold,
    idempotent_match,
    next_attempt,
    request_hash,
    status,
    workers_needed,
)
from streams.tasks.book import TaskBook


def test_finished_task_never_changes_and_late_records_are_stale() -> None:
    s = fold(None, status("t", "QUEUED", 1)).state
    s = fold(s, status("t", "RUNNING", 1, worker="w1")).state
    done = fold(s, status("t", "SUCCEEDED", 1, worker="w1"))
    assert done.accepted and done.state.state == "SUCCEEDED"
    for late in (status("t", "RUNNING", 1, worker="w1"), status("t", "QUEUED", 2),
                 status("t", "FAILED", 2, reason="x"), status("t", "CANCELLED", 1)):
        r = fold(done.state, late)
        assert not r.accepted and r.stale and r.state == done.state
    same = fold(done.state, status("t", "SUCCEEDED", 1, worker="w1"))
    assert not same.accepted and not same.stale  # our own record read back


def test_order_within_an_attempt_and_newer_attempts() -> None:
    running = fold(None, status("t", "RUNNING", 1, worker="w1")).state
    # the API's QUEUED read back after the worker's RUNNING: behind, ignored
    assert not fold(running, status("t", "QUEUED", 1)).accepted
    beat = fold(running, status("t", "RUNNING", 1, worker="w1"))
    assert beat.accepted and beat.heartbeat
    dup = fold(running, status("t", "RUNNING", 1, worker="w2"))
    assert not dup.accepted and not dup.stale
    assert fold(running, status("t", "CANCELLED", 1)).state.state == "CANCELLED"
    retry = fold(running, status("t", "QUEUED", 2)).state
    assert (retry.state, retry.attempt, retry.started_at) == ("QUEUED", 2, None)


def test_identity_survives_records_that_lack_it() -> None:
    first = fold(None, status("t", "QUEUED", 1, submitted_at=5, idempotency_key="k",
                              request_hash="h")).state
    after = fold(first, status("t", "RUNNING", 1, worker="w", started_at=9)).state
    assert (after.submitted_at, after.idempotency_key, after.request_hash) == (5, "k", "h")
    assert after.started_at == 9


def test_next_attempt_and_the_last_one() -> None:
    task = {"task_id": "t", "task_type": "echo", "attempt": 1, "max_attempts": 2,
            "submitted_at": 1, "description": "d", "lease_ms": 10, "enqueued_at": 1}
    nxt, st = next_attempt(task, "boom", 7, "w1")
    assert nxt is not None and (nxt["attempt"], nxt["enqueued_at"], nxt["description"]) == (
        2, 7, "d")
    assert (st["state"], st["attempt"], st["reason"]) == ("QUEUED", 2, "attempt 1 failed: boom")
    last, failed = next_attempt(nxt, "boom", 8, "w2")
    assert last is None and failed["state"] == "FAILED" and failed["attempt"] == 2


def test_idempotency_offsets_estimates() -> None:
    h = request_hash({"task_type": "echo", "description": "x"})
    assert idempotent_match(("t1", h), h) == "t1"
    with pytest.raises(ValueError, match="t1"):
        idempotent_match(("t1", h), request_hash({"task_type": "echo"}))
    assert committable([12, 10, 11], 13) == 10 and committable([], 13) == 13
    assert estimate_start(0, None, 5).predicted_start_ms is None
    assert estimate_start(4, 2.0, 0).predicted_start_ms == 2000
    assert workers_needed(3.0, 1.0, 1.0) == 3
    with pytest.raises(ValueError):
        workers_needed(1.0, 1.0, 0.0)


def test_book_counts_the_result_of_the_succeeded_attempt_once() -> None:
    book = TaskBook()
    book.apply_status(status("t", "QUEUED", 1), 0.0)
    book.apply_status(status("t", "RUNNING", 1, worker="w1", started_at=0), 1.0)
    assert [t.task_id for t in book.expired(5.0, lease_s=2.0)] == ["t"]
    book.apply_status(status("t", "QUEUED", 2), 5.0)  # the keeper's retry
    result = {"task_id": "t", "attempt": 1, "worker": "w1", "output": "1"}
    book.apply_result(result)  # presumed dead, came back: not counted
    book.apply_result(result | {"attempt": 2, "worker": "w2"})  # before its status
    book.apply_status(status("t", "SUCCEEDED", 2, worker="w2", started_at=5000, at=6000), 6.0)
    book.apply_status(status("t", "SUCCEEDED", 1, worker="w1"), 6.5)
    book.apply_result(result | {"attempt": 2, "worker": "w2"})  # a duplicate delivery
    assert book.results["t"]["worker"] == "w2" and book.recorded["t"] == 1
    assert book.stale == 1 and book.expired(100.0, 2.0) == []
    assert book.stats["echo"].service_s == 1.0


def test_book_queue_positions_follow_enqueue_order() -> None:
    book = TaskBook()
    for i, t in enumerate(("a", "b", "c")):
        book.apply_status(status(t, "QUEUED", 1), float(i))
    book.apply_status(status("a", "RUNNING", 1, worker="w"), 3.0)
    book.apply_status(status("a", "QUEUED", 2), 4.0)  # a retry joins the end
    order = [book.estimate(book.tasks[t], 5.0, 0) for t in ("b", "c", "a")]
    assert [e.queue_position for e in order if e is not None] == [0, 1, 2]
    assert book.arrival_rate("echo", 5.0) == 3 / 60


def test_book_queue_positions_exact_in_a_long_queue() -> None:
    book = TaskBook()
    for i in range(12_000):
        book.apply_status(status(f"t{i}", "QUEUED", 1, task_type="echo" if i % 3 else "sleep"),
                          0.0)
    for i in range(0, 8_000, 2):  # every other one of the first 8,000 started
        book.apply_status(status(f"t{i}", "RUNNING", 1, worker="w", task_type="echo" if i % 3
                                 else "sleep"), 1.0)
    # queued ahead of t11999 (echo): the echo tasks of the last 4,000, and of the first
    # 8,000 the odd ones (those not started)
    echo_ahead = sum(1 for i in range(11_999) if i % 3 and (i >= 8_000 or i % 2))
    assert book.position(book.tasks["t11999"]) == echo_ahead
    assert book.position(book.tasks["t1"]) == 0 and book.position(book.tasks["t0"]) == 0
    assert len(book.queued["echo"]) == echo_ahead + 1
    book.forget("t11999")
    assert len(book.queued["echo"]) == echo_ahead


def test_reasserted_running_is_no_heartbeat_and_forget() -> None:
    book = TaskBook()
    book.apply_status(status("t", "QUEUED", 1, idempotency_key="k", request_hash="h"), 0.0)
    book.apply_status(status("t", "RUNNING", 1, worker="w1", source="w1"), 1.0)
    book.apply_status(status("t", "RUNNING", 1, worker="w1", source="api"), 9.0)
    assert [t.task_id for t in book.expired(9.5, lease_s=2.0)] == ["t"]
    book.apply_status(status("t", "RUNNING", 1, worker="w1", source="w1"), 9.6)
    assert book.expired(9.7, lease_s=2.0) == []
    book.forget("t")
    assert "t" not in book.tasks and book.idempotency("k") is None
    assert book.expired(100.0, 2.0) == []
