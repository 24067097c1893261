"""The canned ``tasks`` query on embedded chDB: outcomes by the fold's rule, retries, wait
and run times, worked out by hand."""

from __future__ import annotations

from typing import Any

from processors.tasking import status
from sinks.queries import run_canned
from tests.test_query_canned import T, client, insert

__all__ = ["client"]  # the fixture, used by name


def st(task: str, state: str, attempt: int, at_s: float, started_s: float | None = None,
       task_type: str = "analysis") -> dict[str, Any]:
    return status(task, state, attempt, task_type=task_type, at=T + round(at_s * 1000),
                  submitted_at=T, worker="w" if state != "QUEUED" else None,
                  started_at=None if started_s is None else T + round(started_s * 1000))


def test_tasks_query_counts_the_outcome_that_counts(client: Any) -> None:
    insert(client, "task-status", [
        # a: succeeded first time; waited 1 s, ran 2 s
        st("a", "QUEUED", 1, 0), st("a", "RUNNING", 1, 1, 1), st("a", "SUCCEEDED", 1, 3, 1),
        # b: its worker died; attempt 2 succeeded (waited 4 s, ran 2 s); the late success
        # of attempt 1 comes after and does not count
        st("b", "QUEUED", 1, 0), st("b", "RUNNING", 1, 1, 1), st("b", "QUEUED", 2, 3),
        st("b", "RUNNING", 2, 4, 4), st("b", "SUCCEEDED", 2, 6, 4),
        st("b", "SUCCEEDED", 1, 7, 1),
        # c: failed on every attempt
        st("c", "QUEUED", 1, 0), st("c", "QUEUED", 2, 1), st("c", "FAILED", 2, 2, 1),
        # d: cancelled; e: still queued; f: another type
        st("d", "QUEUED", 1, 0), st("d", "CANCELLED", 1, 1), st("e", "QUEUED", 1, 0),
        st("f", "QUEUED", 1, 0, task_type="echo"),
    ])
    r = run_canned(client, "tasks", {"since_ms": T - 60_000, "until_ms": T + 60_000})
    rows = {row[0]: dict(zip(r.columns, row, strict=True)) for row in r.rows}
    a = rows["analysis"]
    assert (a["tasks"], a["succeeded"], a["failed"], a["cancelled"], a["unfinished"]) == (
        5, 2, 1, 1, 1)
    assert (a["retried"], a["retries"]) == (2, 2)
    assert a["wait_p50_s"] == 2.5 and a["run_p50_s"] == 2.0  # waits 1 and 4, runs 2 and 2
    assert a["succeeded_per_s"] == 0.667  # 2 successes between T+3 s and T+6 s
    assert rows["echo"]["unfinished"] == 1
