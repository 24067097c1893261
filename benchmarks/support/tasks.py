"""The task API and swarm workers for tests and benchmarks: worker processes, the API in
this process (on a free port), submitting many tasks, waiting for them."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.support.processes import REPO, kafka_env, stop_process
from schemas.codec import Codec
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings
from streams.tasks.app import create_task_app, serve_app
from streams.tasks.service import TaskService
from streams.tasks.settings import TaskSettings


def start_swarm_worker(kafka: KafkaSettings, worker_id: str, log: Path, *,
                       handler: str = "echo", types: Sequence[str] = (),
                       concurrency: int = 1,
                       session_timeout_ms: int = 6000) -> subprocess.Popen[bytes]:
    """``loadcast swarm-worker`` in a subprocess (its output in ``log``)."""
    args = [sys.executable, "-m", "loadcast", "swarm-worker", "--handler", handler,
            "--worker-id", worker_id, "--concurrency", str(concurrency),
            "--session-timeout-ms", str(session_timeout_ms)]
    if types:
        args += ["--types", ",".join(types)]
    with log.open("ab") as f:
        return subprocess.Popen(args, env=kafka_env(kafka), stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)


def start_server(args: list[str], env: dict[str, str], port: int,
                 timeout: float = 90.0) -> subprocess.Popen[bytes]:
    """A server process (output discarded); returned once it accepts connections."""
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{args} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError(f"{args} did not listen on {port} in {timeout:g}s")


def wait_ready(procs: Sequence[subprocess.Popen[bytes]], log: Path, timeout: float) -> None:
    """Until every worker printed ``ready`` (RuntimeError naming the log otherwise)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a swarm worker exited: {log.read_text()[-2000:]}")
        if log.exists() and log.read_text().count("ready\n") >= len(procs):
            return
        time.sleep(0.1)
    raise RuntimeError(f"swarm workers not ready in {timeout:g}s: {log.read_text()[-2000:]}")


def stop_workers(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to all at once (each finishes what it runs), then wait for each."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        stop_process(p, 15)


@asynccontextmanager
async def task_api(kafka: KafkaSettings, settings: TaskSettings | None = None,
                   client_id: str = "tasks-test") -> AsyncIterator[tuple[str, TaskService]]:
    """The task API in this process on a free loopback port: ``(base URL, service)``."""
    service = TaskService(KafkaRuntime(kafka), Codec.embedded(), settings or TaskSettings(),
                          client_id)
    runner, port = await serve_app(create_task_app(service), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        await runner.cleanup()


async def submit_many(base: str, bodies: Sequence[dict[str, Any]], *, concurrency: int = 32,
                      timeout: float = 60.0) -> tuple[list[str], list[float]]:
    """POST every body (``concurrency`` at once); ``(task ids in order, seconds each)``.
    Anything but 202 raises."""
    ids: list[str] = [""] * len(bodies)
    took: list[float] = [0.0] * len(bodies)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async def client() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                t0 = time.perf_counter()
                async with http.post(f"{base}/v1/tasks", json=bodies[i]) as r:
                    body = await r.json()
                    if r.status != 202:
                        raise RuntimeError(f"POST answered {r.status}: {body}")
                took[i] = time.perf_counter() - t0
                ids[i] = body["id"]

        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(concurrency))), timeout)
    return ids, took


async def wait_finished(service: TaskService, ids: Sequence[str], timeout: float) -> bool:
    """Until every task in ``ids`` is finished with its result read (succeeded ones);
    False at the timeout."""
    deadline = time.monotonic() + timeout
    book = service.book
    while time.monotonic() < deadline:
        if all(_done(book.tasks.get(t), book.results, t) for t in ids):
            return True
        await asyncio.sleep(0.05)
    return False


def _done(task: Any, results: dict[str, Any], tid: str) -> bool:
    if task is None or not task.finished:
        return False
    return task.state != "SUCCEEDED" or tid in results


async def json_of(http: aiohttp.ClientSession, method: str, url: str,
                  **kwargs: Any) -> tuple[int, Any]:
    """``(status, JSON body)`` of one request."""
    async with http.request(method, url, **kwargs) as r:
        return r.status, await r.json(content_type=None)


__all__ = ["json_of", "start_server", "start_swarm_worker", "stop_workers", "submit_many",
           "task_api", "wait_finished", "wait_ready"]
