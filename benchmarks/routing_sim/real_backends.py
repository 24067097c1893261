"""Loopback backends for ``benchmarks/routing.py --real`` (a child process; stdlib,
aiohttp and the serving helpers of :mod:`streams.sidecar.testing`): worker slots, a
bounded queue, log-normal service times, queued requests past the deadline dropped, one
backend slowed in a time window.

    python -m benchmarks.routing_sim.real_backends '{"deadline_s": 1, "t0": ..., "backends": [...]}'

Prints ``ready`` once every port listens; stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from typing import Any

from aiohttp import web

from streams.sidecar.testing import serve_until_signal, start_site


async def _serve(spec: dict[str, Any]) -> None:
    deadline = spec["deadline_s"]
    clock = {"t0": float(spec["t0"])}
    runners = []
    for b in spec["backends"]:
        sem = asyncio.Semaphore(b["slots"])
        state = {"waiting": 0}
        rng = random.Random(b["port"])

        def handler(b: dict[str, Any] = b, sem: asyncio.Semaphore = sem,
                    state: dict[str, int] = state, rng: random.Random = rng) -> Any:
            hdr = {"X-Endpoint": b["id"]}

            async def handle(request: web.Request) -> web.Response:
                if request.path == "/_t0":  # the run starts now (degradation clock)
                    clock["t0"] = time.time()
                    return web.Response(headers=hdr, text="t0")
                arrived = time.monotonic()
                if sem.locked() and state["waiting"] >= b["queue"]:
                    return web.Response(status=503, headers=hdr, text="queue full")
                state["waiting"] += 1
                try:
                    await sem.acquire()
                finally:
                    state["waiting"] -= 1
                try:
                    if time.monotonic() - arrived > deadline:
                        return web.Response(status=503, headers=hdr, text="expired")
                    s = b["median_s"] * math.exp(rng.gauss(0.0, b["sigma"]))
                    now = time.time() - clock["t0"]
                    if b["slow"] and b["slow"][0] <= now < b["slow"][1]:
                        s *= b["slow"][2]
                    await asyncio.sleep(s)
                    return web.Response(headers=hdr, text=b["id"])
                finally:
                    sem.release()

            return handle

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler())
        runners.append((await start_site(app, b["port"], backlog=2048))[0])
    print("ready", flush=True)
    await serve_until_signal(runners)



if __name__ == "__main__":
    asyncio.run(_serve(json.loads(sys.argv[1])))
