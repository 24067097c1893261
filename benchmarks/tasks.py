"""The task API and its swarm: submit throughput per API core, end-to-end latency, and
the time from a worker's death to its tasks being retried.

On the embedded broker (Tansu), with real processes:

- **submit throughput**: ``wrk`` (or a Python client) POSTs a small task to ``loadcast
  tasks`` in its own process, while two ``echo`` (no-op) swarm workers run the tasks and
  the API follows every status and result they write (``--quick``: one worker). Accepted
  tasks per second of wall time, and per CPU-second of the API process (user + system
  time of all its threads: ``tasks/s per API core``, target >= 2,000; the wall figure
  is bounded by the broker's acknowledgements on a shared machine, the CPU figure is
  what one core of the API serves). Side by side in the same round: a bare aiohttp app
  answering the same POST with a fixed 202 (no validation, no Kafka): the ceiling of
  the HTTP server on this machine. Then nothing lost: every accepted task is on the
  ``tasks`` topic, with its status on ``task-status``.
- **end-to-end latency** under a steady load (open loop, a fixed rate): from the POST
  until the API can answer the result, p50/p99.
- **failover**: tasks of 2 s on two ``sleep`` workers; the one holding tasks gets
  SIGKILL; seconds until its tasks are retried (attempt 2 queued), in lease timeouts
  (target <= 2), and until they succeeded.

    python benchmarks/tasks.py            # full run (about 2 minutes)
    python benchmarks/tasks.py --quick    # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from rich.console import Console
from rich.table import Table

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.support.processes import REPO, kafka_env, stop_process
from benchmarks.support.tasks import (
    start_server,
    start_swarm_worker,
    stop_workers,
    submit_many,
    task_api,
    wait_finished,
    wait_ready,
)
from streams.kafka.broker import EmbeddedBroker, free_port
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import ensure_topics
from streams.tasks.settings import TaskSettings

OUT = REPO / "out" / "benchmarks" / "tasks.json"
BODY = {"task_type": "echo", "description": "benchmark task", "requirements": {"priority": 1}}
console = Console()


# --------------------------------------------------------------------------- load


def _lua(body: dict[str, Any], path: Path) -> Path:
    path.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                    f"wrk.body = [[{json.dumps(body)}]]\n")
    return path


def load(url: str, seconds: float, connections: int, lua: Path) -> dict[str, float]:
    """Closed-loop POSTs for ``seconds``: ``wrk`` when installed, else aiohttp."""
    if shutil.which("wrk"):
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout",
             "5s", "-s", str(lua), url], capture_output=True, text=True, timeout=seconds + 30,
            check=True).stdout
        m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
        if m is None:
            raise RuntimeError(f"wrk output not understood: {out[-500:]}")
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        secs = float(m.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
        return {"requests": int(m.group(1)), "errors": int(bad.group(1)) if bad else 0,
                "seconds": secs}
    return asyncio.run(_py_load(url, seconds, connections))


async def _py_load(url: str, seconds: float, connections: int) -> dict[str, float]:
    n = errors = 0
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async def client() -> None:
            nonlocal n, errors
            while time.monotonic() < t0 + seconds:
                async with http.post(url, json=BODY) as r:
                    await r.read()
                    n += 1
                    errors += r.status != 202

        await asyncio.gather(*(client() for _ in range(connections)))
    return {"requests": n, "errors": errors, "seconds": time.monotonic() - t0}


def measured(proc: subprocess.Popen[bytes], url: str, seconds: float, connections: int,
             lua: Path) -> dict[str, float]:
    """Load ``url`` served by ``proc``: accepted/s, and accepted per CPU-second of ``proc``."""
    p = psutil.Process(proc.pid)
    c0 = sum(p.cpu_times()[:2])
    r = load(url, seconds, connections, lua)
    cpu = sum(p.cpu_times()[:2]) - c0
    ok = r["requests"] - r["errors"]
    return {"accepted_per_s": ok / r["seconds"], "per_core": ok / cpu if cpu else 0.0,
            "cpu_s": cpu, "errors": r["errors"], "requests": r["requests"]}


# --------------------------------------------------------------------------- servers


def serve_baseline(port: int) -> None:
    """The baseline: aiohttp answering every POST /v1/tasks with a fixed 202."""
    from aiohttp import web

    answer = json.dumps({"id": "0" * 32, "state": "queued"})

    async def submit(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text=answer, status=202, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/tasks", submit)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --------------------------------------------------------------------------- parts


@dataclass
class Part:
    """One part's topics (a prefix of its own: no backlog of another part) and workers,
    started before any part runs, so their start-ups overlap."""

    kafka: KafkaSettings
    workers: dict[str, subprocess.Popen[bytes]]
    log: Path


def part(broker: EmbeddedBroker, work: Path, name: str, n: int, **worker: Any) -> Part:
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, partitions=6,
                          topic_prefix=f"bench{uuid.uuid4().hex[:6]}.")
    ensure_topics(kafka)
    log = work / f"{name}.log"
    return Part(kafka, {f"{name}-{i}": start_swarm_worker(kafka, f"{name}-{i}", log, **worker)
                        for i in range(n)}, log)


def throughput(p: Part, rounds: int, seconds: float, connections: int,
               work: Path) -> dict[str, Any]:
    """Baseline and task API side by side, ``rounds`` times, with two echo workers."""
    lua = _lua(BODY, work / "post.lua")
    api_port, base_port = free_port(), free_port()
    kafka, workers = p.kafka, list(p.workers.values())
    api = start_server([sys.executable, "-m", "loadcast", "tasks", "--port", str(api_port)],
                       kafka_env(kafka), api_port)
    base = start_server([sys.executable, str(Path(__file__).resolve()), "--serve-baseline",
                         str(base_port)], dict(os.environ), base_port)
    rows: dict[str, list[dict[str, float]]] = {"baseline": [], "tasks": []}
    try:
        wait_ready(workers, p.log, 90)
        idle = _idle_cpu(api, 2.0)
        for r in range(rounds):
            for name, proc, port in (("baseline", base, base_port), ("tasks", api, api_port)):
                rows[name].append(measured(proc, f"http://127.0.0.1:{port}/v1/tasks", seconds,
                                           connections, lua))
            console.print(f"throughput round {r + 1}/{rounds}: "
                          f"{rows['tasks'][-1]['per_core']:.0f} tasks/s per API core")
    finally:
        stop_workers(workers)
        stop_process(api, 15)
        stop_process(base, 5)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
    ratios = [t["per_core"] / b["per_core"] for t, b in zip(rows["tasks"], rows["baseline"],
                                                          strict=True)]
    return {"rounds": rows, "median": med, "api_idle_cpu_percent": idle,
            "tasks_vs_baseline_per_core": statistics.median(ratios),
            "tasks_vs_baseline_range": [min(ratios), max(ratios)],
            "kept": kept(kafka, sum(int(x["requests"] - x["errors"]) for x in rows["tasks"]))}


def _idle_cpu(proc: subprocess.Popen[bytes], seconds: float) -> float:
    """CPU use of ``proc`` without load, in percent of a core (its fixed cost)."""
    p = psutil.Process(proc.pid)
    c0 = sum(p.cpu_times()[:2])
    time.sleep(seconds)
    return 100 * (sum(p.cpu_times()[:2]) - c0) / seconds


def kept(kafka: KafkaSettings, accepted: int) -> dict[str, int]:
    """Task ids on the tasks and task-status topics, against the 202s counted (a request
    in flight when the load stopped may be on the topics without being counted)."""
    rt = KafkaRuntime(kafka)
    ids = {short: {m.key() for m in rt.read_to_end(rt.topic(short), timeout=60)}
           for short in ("tasks", "task-status")}
    return {"accepted": accepted, "on_tasks": len(ids["tasks"]),
            "with_status": len(ids["tasks"] & ids["task-status"])}


async def latency(p: Part, rate: float, seconds: float) -> dict[str, Any]:
    """Open-loop submits at ``rate``/s for ``seconds`` to an API in this process; submit ->
    result readable from the API, per task."""
    kafka, workers = p.kafka, list(p.workers.values())
    try:
        wait_ready(workers, p.log, 90)
        async with task_api(kafka, TaskSettings(), "bench-latency") as (base, service), \
                aiohttp.ClientSession() as http:
            warm, _ = await submit_many(base, [BODY] * 20)  # the group's first assignment
            if not await wait_finished(service, warm, 60):
                raise RuntimeError(f"warm-up tasks not done: {service.book.counts()}")
            sent: dict[str, float] = {}
            lat: list[float] = []

            async def one() -> None:
                t0 = time.monotonic()
                async with http.post(f"{base}/v1/tasks", json=BODY) as r:
                    sent[(await r.json())["id"]] = t0

            async def watch() -> None:
                while True:
                    now = time.monotonic()
                    for tid in [t for t in sent if t in service.book.results]:
                        lat.append(now - sent.pop(tid))
                    await asyncio.sleep(0.002)

            watcher = asyncio.create_task(watch())
            n = max(1, round(rate * seconds))
            t_start, calls = time.monotonic(), []
            for i in range(n):
                await asyncio.sleep(max(0.0, t_start + i / rate - time.monotonic()))
                calls.append(asyncio.create_task(one()))
            await asyncio.gather(*calls)
            deadline = time.monotonic() + 30
            while sent and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            watcher.cancel()
    finally:
        stop_workers(workers)
    lat.sort()
    return {"rate_per_s": rate, "tasks": n, "completed": len(lat),
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None}


async def failover(p: Part, lease_s: float, task_s: float) -> dict[str, Any]:
    """Kill -9 the sleep worker holding tasks; seconds to retried and to succeeded."""
    kafka, workers = p.kafka, p.workers
    settings = TaskSettings(lease_seconds=lease_s)
    try:
        wait_ready(list(workers.values()), p.log, 90)
        async with task_api(kafka, settings, "bench-failover") as (base, service):
            ids, _ = await submit_many(base, [
                {"task_type": "sleep", "description": f"s{i}",
                 "requirements": {"seconds": task_s}}
                for i in range(4)])
            book = service.book
            deadline = time.monotonic() + 30
            while not any(book.tasks[t].state == "RUNNING" for t in ids):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no task started: {book.counts()}")
                await asyncio.sleep(0.01)
            victim = next(book.tasks[t].worker for t in ids if book.tasks[t].state == "RUNNING")
            held = [t for t in ids if book.tasks[t].worker == victim]
            os.kill(workers[str(victim)].pid, signal.SIGKILL)
            killed = time.monotonic()
            retried: dict[str, float] = {}
            done: dict[str, float] = {}
            while len(done) < len(held) and time.monotonic() < killed + 60:
                for t in held:
                    if book.tasks[t].attempt >= 2:
                        retried.setdefault(t, time.monotonic() - killed)
                    if t in book.results:
                        done.setdefault(t, time.monotonic() - killed)
                await asyncio.sleep(0.01)
            ok = await wait_finished(service, ids, 30)
            twice = [t for t in ids if book.recorded[t] != 1]
    finally:
        stop_workers(list(workers.values()))
    worst = max(retried.values(), default=float("nan"))
    return {"lease_s": lease_s, "held": len(held), "retried_s": worst,
            "retried_in_leases": worst / lease_s,
            "succeeded_s": max(done.values(), default=float("nan")),
            "all_succeeded": ok and all(book.tasks[t].state == "SUCCEEDED" for t in ids),
            "recorded_twice": len(twice),
            "attempts": [book.tasks[t].attempt for t in held]}


# --------------------------------------------------------------------------- report


def show(res: dict[str, Any]) -> None:
    tp = res["throughput"]["median"]
    t = Table(title=f"submit throughput, {res['connections']} connections, {res['seconds']}s x "
                    f"{res['rounds']} rounds ({res['generator']}), medians")
    for col in ("server", "accepted/s (wall)", "per core (/CPU-s)", "CPU-s", "errors"):
        t.add_column(col, justify="right")
    for name, label in (("baseline", "bare aiohttp 202"), ("tasks", "loadcast tasks")):
        v = tp[name]
        t.add_row(label, f"{v['accepted_per_s']:.0f}", f"{v['per_core']:.0f}",
                  f"{v['cpu_s']:.2f}", f"{v['errors']:.0f}")
    console.print(t)
    lat, fo, th = res["latency"], res["failover"], res["throughput"]
    lo, hi = th["tasks_vs_baseline_range"]
    rounds = ", ".join(f"{r['per_core']:.0f}" for r in th["rounds"]["tasks"])
    console.print(f"tasks/s per API core: {tp['tasks']['per_core']:.0f} (target >= 2000; "
                  f"rounds {rounds}); = {th['tasks_vs_baseline_per_core']:.2f}x the bare "
                  f"server ({lo:.2f}-{hi:.2f}); API idle: {th['api_idle_cpu_percent']:.1f}% "
                  "of a core")
    k = th["kept"]
    console.print(f"accepted (202) {k['accepted']}: on the tasks topic {k['on_tasks']}, with "
                  f"a status {k['with_status']} (none lost: {k['with_status'] >= k['accepted']})")
    console.print(f"end to end at {lat['rate_per_s']:g}/s: p50 {lat['p50_ms']:.0f} ms, "
                  f"p99 {lat['p99_ms']:.0f} ms ({lat['completed']}/{lat['tasks']} tasks)")
    console.print(f"worker killed -> its {fo['held']} task(s) retried in {fo['retried_s']:.2f} s "
                  f"= {fo['retried_in_leases']:.2f} lease timeouts (target <= 2); succeeded "
                  f"after {fo['succeeded_s']:.2f} s; recorded twice: {fo['recorded_twice']}")


def run(quick: bool, rounds: int, seconds: float, connections: int, rate: float,
        lease_s: float) -> dict[str, Any]:
    if quick:
        rounds, seconds, rate = 1, 2.0, 50.0
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = 1 if quick else 2  # quick: fewer processes starting at once on a small box
        parts = [part(broker, work, "echo", n, concurrency=8),
                 part(broker, work, "lat", n, concurrency=4),
                 part(broker, work, "sleep", 2, handler="sleep", types=("sleep",),
                      concurrency=2, session_timeout_ms=3000)]
        try:
            tp = throughput(parts[0], rounds, seconds, connections, work)
            lat = asyncio.run(latency(parts[1], rate, seconds if quick else 10.0))
            fo = asyncio.run(failover(parts[2], lease_s, 1.0 if quick else 2.0))
        finally:
            for p in parts:
                stop_workers(list(p.workers.values()))
    return {"quick": quick, "rounds": rounds, "seconds": seconds, "connections": connections,
            "generator": "wrk" if shutil.which("wrk") else "python", "cpus": os.cpu_count(),
            "throughput": tp, "latency": lat, "failover": fo,
            "targets": {"tasks_per_api_core": ">= 2000", "retried_in_leases": "<= 2"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="one short round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rate", type=float, default=200.0, help="tasks/s of the latency part")
    p.add_argument("--lease", type=float, default=2.0, help="lease timeout of the failover part")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--serve-baseline", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve_baseline:
        serve_baseline(a.serve_baseline)
        return 0
    res = run(a.quick, a.rounds, a.seconds, a.connections, a.rate, a.lease)
    show(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    console.print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
