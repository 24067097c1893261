"""The task API and the swarm on the embedded broker, with real worker processes.

One set of workers serves the whole module (their start-up is most of the cost): two for
``echo`` and ``analysis`` (the tests' ``dispatch`` handler), two for ``research`` whose
tasks sleep, one of which the failover test kills with SIGKILL. ``code_generation`` has
no worker: its tasks stay queued (queue positions, cancel).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from benchmarks.support.processes import kafka_env, stop_process
from benchmarks.support.tasks import (
    json_of,
    start_server,
    start_swarm_worker,
    stop_workers,
    submit_many,
    task_api,
    wait_finished,
    wait_ready,
)
from schemas.codec import Codec
from streams.kafka.broker import EmbeddedBroker, free_port
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import ensure_topics
from streams.tasks.settings import TaskSettings

HANDLER = "tests.task_handlers:dispatch"
SETTINGS = TaskSettings(lease_seconds=2.0, max_attempts=3, max_body_bytes=4096)


@dataclass
class Swarm:
    kafka: KafkaSettings
    workers: dict[str, subprocess.Popen[bytes]]
    log: Path


@pytest.fixture(scope="module")
def swarm(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap,
                          topic_prefix=f"t{uuid.uuid4().hex[:8]}.", partitions=6)
    ensure_topics(kafka)
    log = tmp_path_factory.mktemp("swarm") / "workers.log"
    workers = {
        f"main-{i}": start_swarm_worker(kafka, f"main-{i}", log, handler=HANDLER,
                                        types=("echo", "analysis"), concurrency=4)
        for i in range(2)
    } | {
        f"research-{i}": start_swarm_worker(kafka, f"research-{i}", log, handler=HANDLER,
                                            types=("research",), concurrency=2,
                                            session_timeout_ms=3000)
        for i in range(2)
    }
    try:
        wait_ready(list(workers.values()), log, 90)
        yield Swarm(kafka, workers, log)
    finally:
        stop_workers(list(workers.values()))


def results_per_task(kafka: KafkaSettings) -> Counter[str]:
    """How many TaskResult records each task has on task-results (attempts that ran)."""
    rt = KafkaRuntime(kafka)
    return Counter((m.key() or b"").decode()
                   for m in rt.read_to_end(rt.topic("task-results"), timeout=30))


@pytest.mark.asyncio
async def test_bad_bodies_idempotency_queue_and_cancel(kafka: KafkaSettings) -> None:
    settings = SETTINGS.model_copy(update={"telemetry_interval_seconds": 0.2})
    async with task_api(kafka, settings) as (base, service), aiohttp.ClientSession() as http:
        url = f"{base}/v1/tasks"
        for path in ("/health", "/healthz"):  # /health like the other services
            status, body = await json_of(http, "GET", f"{base}{path}")
            assert status == 200 and body["ok"] is True, (path, body)
        status, body = await json_of(http, "POST", url, json={"task_type": "translation"})
        assert status == 422 and body["field"] == "task_type"
        assert "code_generation, analysis, research, echo, sleep" in body["error"]
        status, body = await json_of(http, "POST", url, json={
            "task_type": "echo", "requirements": {"max_tokens": 0}})
        assert status == 422 and body["field"] == "requirements.max_tokens"
        status, body = await json_of(http, "POST", url, json={"description": "x"})
        assert status == 422 and body["field"] == "task_type"
        status, body = await json_of(http, "POST", url, data=b"{not json")
        assert status == 422 and body["field"] == "body"
        status, body = await json_of(http, "POST", url, json={"task_type": "echo",
                                                              "description": "x" * 5000})
        assert status == 413, body

        # Idempotency: the same key and body is the same task; another body is 409.
        task = {"task_type": "code_generation", "description": "write a parser",
                "requirements": {"model": "m-large", "priority": 2}}
        key = {"Idempotency-Key": "order-17"}
        s1, first = await json_of(http, "POST", url, json=task, headers=key)
        s2, again = await json_of(http, "POST", url, json=task, headers=key)
        s3, other = await json_of(http, "POST", url, json=task | {"description": "no"},
                                  headers=key)
        assert (s1, s2, s3) == (202, 202, 409)
        assert first["id"] == again["id"]
        assert first["id"] in other["error"]

        # Nobody serves code_generation: tasks queue up in order.
        ids, _ = await submit_many(base, [task | {"description": f"t{i}"} for i in range(2)])
        positions = [(await json_of(http, "GET", f"{url}/{t}"))[1]["queue_position"]
                     for t in [first["id"], *ids]]
        assert positions == [0, 1, 2]

        status, body = await json_of(http, "DELETE", f"{url}/{ids[0]}")
        assert status == 200 and body["state"] == "cancelled"
        status, body = await json_of(http, "DELETE", f"{url}/{ids[0]}")
        assert status == 409 and body["state"] == "cancelled"
        status, body = await json_of(http, "GET", f"{url}/{ids[0]}/results")
        assert status == 404 and body["state"] == "cancelled"
        status, body = await json_of(http, "GET", f"{url}/{ids[1]}")
        assert body["queue_position"] == 1  # the cancelled one left the queue
        assert (await json_of(http, "GET", f"{url}/nope"))[0] == 404
        await demand_is_telemetry_and_forecasts_are_used(kafka, http, base)

    # A restarted API (a new process's state: nothing but the topics) knows the same,
    # the idempotency key included.
    async with task_api(kafka, SETTINGS, "restarted") as (base, again_svc):
        assert again_svc.book.tasks[ids[0]].state == "CANCELLED"
        assert again_svc.book.tasks[ids[1]].state == "QUEUED"
        async with aiohttp.ClientSession() as http:
            s4, replay = await json_of(http, "POST", f"{base}/v1/tasks", json=task,
                                       headers=key)
        assert (s4, replay["id"]) == (202, first["id"])
        assert len(again_svc.book.tasks) == len(service.book.tasks)


async def demand_is_telemetry_and_forecasts_are_used(kafka: KafkaSettings,
                                                      http: aiohttp.ClientSession,
                                                      base: str) -> None:
    """The 3 code_generation tasks accepted (not the replay, not the 409) are telemetry of
    endpoint tasks/code_generation; a LoadScore of it is the forecast the answer uses."""
    rt = KafkaRuntime(kafka)
    codec = Codec.embedded()
    deadline = time.monotonic() + 10
    counted = 0
    while counted < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        windows = [codec.decode(m.value() or b"", "EndpointTelemetry")
                   for m in rt.read_to_end(rt.topic("telemetry"), timeout=10)]
        counted = sum(w["request_count"] for w in windows
                      if w["endpoint_id"] == "tasks/code_generation")
    assert counted == 3 and {w["api"] for w in windows} == {"tasks"}
    now = int(time.time() * 1000)
    score = {"endpoint_id": "tasks/code_generation", "api": "tasks", "region": "central",
             "computed_at": now, "valid_until": now + 120_000, "score": 0.5,
             "capacity_rps": 0.0, "current_rps": 1.0, "predicted_utilization": 0.0,
             "latency_p99_ms": 0.0, "error_rate": 0.0, "step_seconds": 60,
             "forecast": [{"horizon": h, "at": now + h * 60_000, "mean": 4.0 * h,
                           "lower": 0.0, "upper": 9.0 * h} for h in (1, 2)]}
    producer = rt.producer()
    producer.produce(rt.topic("load-scores"), codec.encode("LoadScore", score),
                     b"tasks/code_generation")
    producer.flush(10)
    row: dict[str, Any] = {}
    while row.get("arrival_source") != "forecast" and time.monotonic() < deadline + 10:
        await asyncio.sleep(0.05)
        _, body = await json_of(http, "GET", f"{base}/v1/tasks/forecast?lead_seconds=120")
        row = next(r for r in body["types"] if r["task_type"] == "code_generation")
    assert row["arrival_source"] == "forecast" and row["arrival_per_s"] == 8.0
    assert row["queued"] == 2  # the first and the last; the middle one was cancelled


@pytest.mark.slow
@pytest.mark.asyncio
async def test_thousand_tasks_each_result_once_and_restart(swarm: Swarm) -> None:
    bodies = [{"task_type": "echo", "description": f"task {i}"} for i in range(1000)]
    async with task_api(swarm.kafka, SETTINGS) as (base, service):
        ids, _ = await submit_many(base, bodies, concurrency=32)
        assert len(set(ids)) == 1000
        assert await wait_finished(service, ids, 60), service.book.counts()
        book = service.book
        assert Counter(book.tasks[t].state for t in ids) == {"SUCCEEDED": 1000}
        assert all(book.recorded[t] == 1 for t in ids)
        assert [json.loads(book.results[t]["output"])["echo"] for t in ids] == [
            b["description"] for b in bodies]
        async with aiohttp.ClientSession() as http:
            status, res = await json_of(http, "GET", f"{base}/v1/tasks/{ids[7]}/results")
        assert status == 200 and res["output"]["echo"] == "task 7"
        assert res["worker"] in swarm.workers
    ran = results_per_task(swarm.kafka)
    assert all(ran[t] == 1 for t in ids), "a task ran twice without any failure"

    # A restarted API: another `loadcast tasks` process, nothing but the topics to go on.
    port = free_port()
    api = start_server([sys.executable, "-m", "loadcast", "tasks", "--port", str(port)],
                       kafka_env(swarm.kafka, LOADCAST_TASKS__TELEMETRY_INTERVAL_SECONDS="0"),
                       port)
    try:
        async with aiohttp.ClientSession() as http:
            answers = await asyncio.gather(*(
                json_of(http, "GET", f"http://127.0.0.1:{port}/v1/tasks/{t}") for t in ids))
            rs, res = await json_of(http, "GET",
                                    f"http://127.0.0.1:{port}/v1/tasks/{ids[9]}/results")
    finally:
        stop_process(api, 10)
    assert all(s == 200 and b["state"] == "succeeded" and b["attempt"] == 1
               for s, b in answers)
    assert rs == 200 and res["output"]["echo"] == "task 9"


@pytest.mark.slow
@pytest.mark.asyncio
async def test_failing_task_ends_failed_with_reason(swarm: Swarm) -> None:
    async with task_api(swarm.kafka, SETTINGS) as (base, service):
        ids, _ = await submit_many(base, [{"task_type": "analysis", "description": "bad",
                                           "requirements": {"fail": True}}])
        assert await wait_finished(service, ids, 30)
        async with aiohttp.ClientSession() as http:
            status, body = await json_of(http, "GET", f"{base}/v1/tasks/{ids[0]}")
            rstatus, rbody = await json_of(http, "GET", f"{base}/v1/tasks/{ids[0]}/results")
    assert status == 200 and body["state"] == "failed" and body["attempt"] == 3
    assert body["reason"] == ("attempt 3 of 3 failed: RuntimeError: told to fail "
                              "(attempt 3)")
    assert rstatus == 404 and rbody["state"] == "failed"


@pytest.mark.slow
@pytest.mark.asyncio
async def test_kill_9_of_a_worker_retries_its_tasks_elsewhere(swarm: Swarm) -> None:
    async with task_api(swarm.kafka, SETTINGS) as (base, service):
        ids, _ = await submit_many(base, [
            {"task_type": "research", "description": f"r{i}", "requirements": {"seconds": 2}}
            for i in range(4)])
        book = service.book
        deadline = time.monotonic() + 30
        while not any(book.tasks[t].state == "RUNNING" for t in ids):
            assert time.monotonic() < deadline, book.counts()
            await _sleep(0.02)
        victim = next(book.tasks[t].worker for t in ids if book.tasks[t].state == "RUNNING")
        assert victim is not None
        held = [t for t in ids if book.tasks[t].worker == victim
                and book.tasks[t].state == "RUNNING"]
        os.kill(swarm.workers[victim].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        retried_at: dict[str, float] = {}
        while len(retried_at) < len(held) and time.monotonic() < killed_at + 30:
            for t in held:
                if book.tasks[t].attempt >= 2 and t not in retried_at:
                    retried_at[t] = time.monotonic() - killed_at
            await _sleep(0.02)
        assert await wait_finished(service, ids, 40), book.counts()
    assert set(retried_at) == set(held)
    # the lease (2 s) plus the keeper's period (a quarter of it), with room for a slow box
    assert max(retried_at.values()) <= 2 * SETTINGS.lease_seconds + 1.5, retried_at
    for t in ids:
        assert book.tasks[t].state == "SUCCEEDED" and book.recorded[t] == 1
    for t in held:
        assert book.tasks[t].attempt >= 2
        assert book.results[t]["worker"] != victim
        assert book.results[t]["attempt"] == book.tasks[t].attempt


async def _sleep(s: float) -> None:
    await asyncio.sleep(s)
