"""Async prediction jobs: queued, run in chunks on the event loop, kept for a while.

A job answers its items :data:`CHUNK` at a time and yields to the event loop between
chunks, so the API keeps answering while a million items are worked through. At most
:data:`RUNNING` jobs run at once (the others wait ``queued``); a job running longer than
``max_seconds`` fails, and so does one whose answering raises (the reason is kept).
Results are kept as encoded JSON per item (a fraction of the memory of Python dicts) and
handed out in pages. The store keeps at most ``max_jobs`` jobs: finished ones expire
``ttl_s`` after they finish, and the oldest finished one makes room for a new job; when
every kept job is still queued or running, a new one is refused (:class:`JobsFull`).
The same ``Idempotency-Key`` returns the same job while it is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

CHUNK = 2_000  # items answered between two yields to the event loop
RUNNING = 2  # jobs answered at once

Answer = Callable[[Any, int], dict[str, Any]]  # (item, now_ms) -> ItemResult as a dict


class JobsFull(Exception):
    """Every kept job is still queued or running."""


@dataclass
class Job:
    """One async job and its results (encoded JSON, one per item)."""

    id: str
    key: str | None
    items: Sequence[Any]
    created_at: float
    state: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    done: int = 0
    errors: int = 0
    error: str | None = None
    results: list[bytes] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    total: int = 0
    result_bytes: int = 0

    def finished(self) -> bool:
        return self.state in ("succeeded", "failed")


def _ms(t: float | None) -> int | None:
    return None if t is None else round(t * 1000)


class JobStore:
    """The jobs of one API process, bounded in number and time."""

    def __init__(self, *, max_jobs: int, ttl_s: float, max_seconds: float,
                 max_result_bytes: int = 1 << 30, chunk: int = CHUNK) -> None:
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self.max_seconds = max_seconds
        self.chunk = chunk
        self.max_result_bytes = max_result_bytes
        self.kept_bytes = 0  # encoded results of every kept job
        self.jobs: dict[str, Job] = {}
        self.by_key: dict[str, str] = {}
        self._slots = asyncio.Semaphore(RUNNING)

    def _expire(self, now: float) -> None:
        for job in [j for j in self.jobs.values()
                    if j.finished_at is not None and now - j.finished_at > self.ttl_s]:
            self._drop(job)

    def _drop(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        self.kept_bytes -= job.result_bytes
        job.result_bytes = 0
        if job.key is not None and self.by_key.get(job.key) == job.id:
            del self.by_key[job.key]

    def submit(self, items: Sequence[Any], answer: Answer, key: str | None = None
               ) -> tuple[Job, bool]:
        """The job for ``items`` (started) and True; or the kept job of ``key`` and False.
        Raises :class:`JobsFull` when there is no room."""
        now = time.time()
        self._expire(now)
        if key is not None and key in self.by_key:
            return self.jobs[self.by_key[key]], False
        if len(self.jobs) >= self.max_jobs:
            finished = [j for j in self.jobs.values() if j.finished()]
            if not finished:
                raise JobsFull(f"{len(self.jobs)} jobs are queued or running, "
                               f"at most {self.max_jobs} are kept")
            self._drop(min(finished, key=lambda j: j.finished_at or 0.0))
        job = Job(id=uuid.uuid4().hex, key=key, items=items, created_at=now,
                  total=len(items))
        self.jobs[job.id] = job
        if key is not None:
            self.by_key[key] = job.id
        job.task = asyncio.create_task(self._run(job, answer), name=f"job-{job.id}")
        return job, True

    def get(self, job_id: str) -> Job | None:
        """The job if it is kept."""
        self._expire(time.time())
        return self.jobs.get(job_id)

    async def _run(self, job: Job, answer: Answer) -> None:
        async with self._slots:
            job.state = "running"
            job.started_at = time.time()
            deadline = time.monotonic() + self.max_seconds
            try:
                for start in range(0, job.total, self.chunk):
                    now_ms = round(time.time() * 1000)
                    size = 0
                    for i in range(start, min(start + self.chunk, job.total)):
                        res = answer(job.items[i], now_ms)
                        res["index"] = i
                        job.errors += res.get("error") is not None
                        # a copy: orjson's bytes keep a 4 KiB buffer each (a million
                        # results would hold 4 GB instead of their ~400 MB)
                        encoded = bytes(memoryview(orjson.dumps(res)))
                        size += len(encoded)
                        job.results.append(encoded)
                    job.done = len(job.results)
                    job.result_bytes += size
                    self.kept_bytes += size
                    if self.kept_bytes > self.max_result_bytes:
                        raise MemoryError(
                            f"results over {self.max_result_bytes} bytes (all kept jobs) "
                            f"after {job.done} of {job.total} items; ask fewer items or "
                            "horizons, or fetch and let older jobs expire")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"ran over {self.max_seconds:g} s "
                                           f"({job.done} of {job.total} items answered)")
                    await asyncio.sleep(0)  # let the server answer between chunks
                job.state = "succeeded"
            except Exception as e:  # any failure fails the job and says why
                job.state = "failed"
                job.error = str(e) or type(e).__name__
                job.results = []
                self.kept_bytes -= job.result_bytes
                job.result_bytes = 0
            finally:
                job.items = ()  # the questions are answered or abandoned: free them
                job.finished_at = time.time()

    def page(self, job: Job, offset: int, limit: int) -> bytes:
        """The job as a JobResponse JSON body with results[offset:offset + limit]."""
        head: dict[str, Any] = {
            "id": job.id, "state": job.state, "items": job.total, "done": job.done,
            "errors": job.errors, "error": job.error,
            "created_at": _ms(job.created_at), "started_at": _ms(job.started_at),
            "finished_at": _ms(job.finished_at),
            "expires_at": _ms(None if job.finished_at is None
                              else job.finished_at + self.ttl_s),
            "offset": offset,
        }
        rows: list[bytes] = []
        if job.state == "succeeded":
            rows = job.results[offset:offset + limit]
            end = offset + len(rows)
            head["next_offset"] = end if end < len(job.results) else None
        else:
            head["next_offset"] = None
        return json.dumps(head).encode()[:-1] + b', "results": [' + b",".join(rows) + b"]}"

    async def close(self) -> None:
        """Cancel the jobs still queued or running."""
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
