"""CPU per upstream exchange of the built-in proxy's two ways to its upstreams.

Side by side in one run, against the same loopback upstream (an aiohttp server in a process
of its own, ``streams.sidecar.testing``), the same number of requests with the same
concurrency from this process, pinned to one CPU (the upstream on the others):

- ``ClientSession``: ``aiohttp.ClientSession.request`` with the proxy's session settings
  (:func:`streams.sidecar.relay.upstream_session`), the answer read whole, released;
- ``UpstreamPool``: :class:`streams.sidecar.upstream.UpstreamPool`, the same request and
  reading (what the proxy uses for requests whose body is in memory).

Reported: CPU microseconds of this process per exchange (user + system) and exchanges per
second, per round; medians over interleaved rounds, and the pool's ratio against the
session (the baseline). ``--quick`` is a few hundred requests, for the test.

    python benchmarks/upstream.py            # ~30 s
    python benchmarks/upstream.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from yarl import URL

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.support.cpu import split_cpus
from streams.sidecar.relay import upstream_session
from streams.sidecar.testing import BackendProcess
from streams.sidecar.upstream import SUPPORTED, Answer, UpstreamPool

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "benchmarks" / "upstream.json"
HEADERS = [("Host", "bench"), ("Accept", "*/*"), ("X-Forwarded-For", "127.0.0.1")]
console = Console()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def exchanges(client: str, url: URL, n: int, concurrency: int) -> None:
    """``n`` GETs of ``url`` through ``client``, ``concurrency`` at once, each answer read
    whole and released."""
    send: Callable[[], Awaitable[Answer]]
    if client == "ClientSession":
        s = upstream_session(256, 1.0, 30.0)
        send, close = (lambda: s.request("GET", url, headers=HEADERS,
                                         allow_redirects=False)), s.close
    else:
        p = UpstreamPool(256, 1.0, 30.0)
        send, close = (lambda: p.request("GET", url, HEADERS)), p.close
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            r = await send()
            try:
                await r.read()
            finally:
                r.release()

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await close()


CLIENTS = ("ClientSession", "UpstreamPool")


def run(n: int, rounds: int, concurrency: int) -> dict[str, Any]:
    import uvloop

    if not SUPPORTED:
        raise SystemExit("this aiohttp's client protocol cannot be driven: "
                         "the proxy uses ClientSession only")
    mine, theirs = split_cpus()
    raw: dict[str, list[dict[str, float]]] = {k: [] for k in CLIENTS}
    with BackendProcess({"a": 0}) as b:
        if theirs is not None and b.proc is not None:
            os.sched_setaffinity(b.proc.pid, theirs)
        os.sched_setaffinity(0, mine)
        url = URL(b.urls["a"] + "/x")
        for name in CLIENTS:  # both warm: imports, the upstream
            uvloop.run(exchanges(name, url, min(n, 200), concurrency))
        for i in range(rounds):
            names = list(CLIENTS) if i % 2 == 0 else list(reversed(CLIENTS))
            for name in names:
                c0, t0 = _cpu(), time.perf_counter()
                uvloop.run(exchanges(name, url, n, concurrency))
                c1, t1 = _cpu(), time.perf_counter()
                raw[name].append({"cpu_us": (c1 - c0) / n * 1e6, "rps": n / (t1 - t0)})
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("cpu_us", "rps")}
           for k, v in raw.items()}
    per = [s["cpu_us"] / p["cpu_us"] for s, p in zip(raw["ClientSession"], raw["UpstreamPool"],
                                                    strict=True)]
    return {"requests_per_round": n, "rounds": rounds, "concurrency": concurrency,
            "cpus": sorted(mine), "raw": raw, "clients": med,
            "session_vs_pool_cpu_per_round": per,
            "session_vs_pool_cpu": statistics.median(per)}


def show(res: dict[str, Any]) -> None:
    t = Table(title=f"upstream exchanges: {res['requests_per_round']} GETs x {res['rounds']} "
                    f"interleaved rounds, {res['concurrency']} at once, this process on CPU "
                    f"{res['cpus']}, medians")
    for c in ("client", "CPU µs / exchange", "exchanges/s", "CPU vs UpstreamPool"):
        t.add_column(c, justify="right")
    pool = res["clients"]["UpstreamPool"]["cpu_us"]
    for k, v in res["clients"].items():
        t.add_row(k, f"{v['cpu_us']:.1f}", f"{v['rps']:.0f}", f"{v['cpu_us'] / pool:.2f}x")
    console.print(t)
    console.print(f"ClientSession / UpstreamPool CPU per exchange = "
                  f"{res['session_vs_pool_cpu']:.2f}x (per round "
                  f"{[round(x, 2) for x in res['session_vs_pool_cpu_per_round']]})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a few hundred requests")
    p.add_argument("--requests", type=int, default=20000, help="per client and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    if a.quick:
        a.requests, a.rounds = 300, 1
    res = run(a.requests, a.rounds, a.concurrency)
    show(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    console.print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
