"""Simulated API backends for the demo: aiohttp servers on 127.0.0.1 with a queueing
latency model, all in one child process (``python -m loadcast.demo.backends SPEC.json``).

Each backend has ``slots`` workers; a request holds one for a log-normal service time
(median ``service_ms``, × the slow-down factor inside its degrade window) and waits in a
FIFO queue while all are busy. So latency climbs as utilization nears capacity (queueing
delay), and past capacity the queue fills: a request that finds ``queue_limit`` others
waiting, or waits longer than ``max_wait_s``, gets 503. ``/health`` answers at once.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from streams.sidecar.testing import serve_until_signal, start_site

MAX_WAIT_S = 1.0
SIGMA = 0.25  # log-normal spread of service times


def slowdown(degrade: tuple[float, float, float] | None, now: float) -> float:
    """The service-time factor at epoch second ``now``.

    >>> slowdown((10.0, 20.0, 3.0), 15.0), slowdown((10.0, 20.0, 3.0), 25.0), slowdown(None, 1)
    (3.0, 1.0, 1.0)
    """
    if degrade is None:
        return 1.0
    a, b, f = degrade
    return f if a <= now < b else 1.0


def service_seconds(service_ms: float, factor: float, rng: random.Random) -> float:
    """One log-normal service time (median ``service_ms`` × ``factor``), in seconds."""
    return service_ms * factor * math.exp(rng.gauss(0.0, SIGMA)) / 1000.0


@dataclass
class QueueingBackend:
    """The queue of one backend (state for its aiohttp handler)."""

    id: str
    slots: int
    service_ms: float
    queue_limit: int
    degrade: tuple[float, float, float] | None = None
    max_wait_s: float = MAX_WAIT_S
    seed: int = 0

    def __post_init__(self) -> None:
        self.sem = asyncio.Semaphore(self.slots)
        self.waiting = 0
        self.rng = random.Random(f"{self.id}-{self.seed}")
        self.served = 0
        self.rejected = 0

    async def handle(self, request: web.Request) -> web.Response:
        hdr = {"X-Endpoint": self.id}
        if request.path == "/health":
            return web.Response(text="ok", headers=hdr)
        if self.waiting >= self.queue_limit:
            self.rejected += 1
            return web.Response(status=503, text="queue full", headers=hdr)
        self.waiting += 1
        try:
            async with asyncio.timeout(self.max_wait_s):
                await self.sem.acquire()
        except TimeoutError:
            self.rejected += 1
            return web.Response(status=503, text="waited too long", headers=hdr)
        finally:
            self.waiting -= 1
        try:
            await asyncio.sleep(service_seconds(self.service_ms,
                                                slowdown(self.degrade, time.time()), self.rng))
        finally:
            self.sem.release()
        self.served += 1
        return web.Response(text=self.id, headers=hdr)


async def start_backend(b: QueueingBackend, port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve ``b`` on 127.0.0.1:``port`` (0 = a free one); returns the runner and port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", b.handle)
    return await start_site(app, port)


async def serve(specs: list[dict[str, Any]]) -> None:
    """Serve every backend of ``specs``; print ``{"id": port, ...}`` once all listen; run
    until SIGTERM/SIGINT."""
    runners, ports = [], {}
    for s in specs:
        deg = tuple(s["degrade"]) if s.get("degrade") else None
        b = QueueingBackend(s["id"], s["slots"], s["service_ms"], s["queue_limit"],
                            deg)
        runner, ports[s["id"]] = await start_backend(b, s.get("port", 0))
        runners.append(runner)
    print(json.dumps(ports), flush=True)
    await serve_until_signal(runners)


def serve_one(port: int, name: str, slots: int, service_ms: float) -> None:
    """One backend in the foreground (the edge mirror bundle's entry point)."""
    asyncio.run(serve([{"id": name, "slots": slots, "service_ms": service_ms,
                        "queue_limit": slots * 10, "port": port}]))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m loadcast.demo.backends SPEC.json")
    with open(args[0], encoding="utf-8") as f:
        specs = json.load(f)
    asyncio.run(serve(specs))


if __name__ == "__main__":
    main()
