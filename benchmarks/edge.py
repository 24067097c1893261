"""What the edge serves itself: the built-in proxy's response cache and forecast-gated
warming on a replayed trace, and cached-hit throughput against HAProxy's cache.

1. Replayed trace (the same arrivals for every configuration, seeded): keys drawn with a
   Zipf popularity, Poisson arrivals at a base rate, then a spike at several times the rate.
   A loopback origin (in this process, a fixed service time) answers every key with
   ``Cache-Control: max-age=M, stale-while-revalidate=S`` and an ETag. Side by side:

   - ``no-cache``: the plain proxy;
   - ``swr``: the response cache (stale-while-revalidate, single-flight);
   - ``swr+warming``: the same plus forecast-gated warming of the top-K keys, under an
     origin budget. The forecast is scripted (a spike seen ``lead`` seconds ahead, as the
     scorer's peak forecast would say; forecast accuracy is benchmarked in
     ``forecast_accuracy.py``): this measures what the cache does with a forecast.

   Reported: origin requests (all, and during the spike), hit ratio (answered without
   waiting for the origin: HIT or STALE), client p50/p99. Target: warming cuts origin
   requests during the spike by >= 30 % against SWR alone.

2. Cached-hit throughput: the built-in proxy (its own process, uvloop, cache on) against
   HAProxy with its cache on (the config the sidecar writes), both answering the same
   stored response, ``wrk`` with 48 connections (a Python load generator without wrk).
   Target: built-in >= 0.5x HAProxy. Median of the per-round ratios. wrk repeats the same
   request bytes, the best case for the proxy (it answers bytes it has parsed before
   without parsing them again, :mod:`streams.sidecar.fastpath`); ``proxy (new bytes)``
   is the same proxy when every request differs (``new_bytes.lua``: a counter header).

    python benchmarks/edge.py            # full run (about 2 minutes)
    python benchmarks/edge.py --quick    # about 30 s; what the test runs
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from rich.console import Console
from rich.table import Table

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.proxy import load
from benchmarks.support.cpu import measured, per_cpu_second, pin, split_cpus
from benchmarks.support.processes import stop_process
from streams.kafka.broker import free_port
from streams.sidecar.app import Sidecar
from streams.sidecar.config import SidecarSettings, Upstream
from streams.sidecar.edge_config import EdgeCacheSettings
from streams.sidecar.haproxy import HAProxyProcess, haproxy_binary, render_config
from streams.sidecar.proxy_plane import ProxyPlane
from streams.sidecar.testing import BackendProcess, start_site

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "benchmarks" / "edge.json"
console = Console(width=130)


@dataclass(frozen=True)
class Trace:
    keys: int = 400
    zipf_s: float = 1.1
    base_rps: float = 100.0
    spike_rps: float = 400.0
    base_s: float = 16.0  # two max-ages: the cache is in its steady state
    spike_s: float = 4.0
    tail_s: float = 1.0
    max_age_s: int = 8
    swr_s: int = 4
    lead_s: float = 4.0  # the forecast sees the spike this far ahead
    origin_ms: float = 20.0
    top_k: int = 100
    budget_per_min: float = 1200.0
    seed: int = 7

    def arrivals(self) -> list[tuple[float, int]]:
        """(seconds from start, key index): Poisson arrivals, Zipf keys."""
        rng = random.Random(self.seed)
        weights = [1.0 / (i + 1) ** self.zipf_s for i in range(self.keys)]
        cum = list(_cumsum(weights))
        out: list[tuple[float, int]] = []
        t = 0.0
        end = self.base_s + self.spike_s + self.tail_s
        while True:
            spike = self.base_s <= t < self.base_s + self.spike_s
            t += rng.expovariate(self.spike_rps if spike else self.base_rps)
            if t >= end:
                return out
            out.append((t, bisect.bisect(cum, rng.random() * cum[-1])))


def _cumsum(xs: list[float]) -> list[float]:
    acc, out = 0.0, []
    for x in xs:
        acc += x
        out.append(acc)
    return out


class TraceOrigin:
    """The origin of the replay: every key cacheable, a fixed service time, hits logged."""

    def __init__(self, tr: Trace) -> None:
        self.tr = tr
        self.hits: list[float] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(time.time())
        await asyncio.sleep(self.tr.origin_ms / 1000)
        etag = f'"{request.path}"'
        headers = {"Cache-Control": f"max-age={self.tr.max_age_s}, "
                                    f"stale-while-revalidate={self.tr.swr_s}", "ETag": etag}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=b'{"v": "%s"}' % request.path.encode() * 40,
                            content_type="application/json", headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self._runner, port = await start_site(app)
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def _settings(tr: Trace, config: str, upstream: str, port: int, admin: int) -> dict[str, Any]:
    return {
        "upstreams": [{"id": "o", "url": upstream, "api": "bench"}], "listen_port": port,
        "admin_port": admin, "cache": {"enabled": config != "no-cache"},
        "warming": {"enabled": config == "swr+warming", "top_k": tr.top_k,
                    "lead_s": tr.lead_s, "budget_per_min": tr.budget_per_min,
                    "interval_s": 0.25, "threshold": 0.8}}


async def replay(tr: Trace, config: str) -> dict[str, Any]:
    """Replay the trace through the built-in proxy (its own process) in ``config``; what it
    cost the origin and what the clients saw."""
    origin = TraceOrigin(tr)
    await origin.start()
    port, admin = free_port(), free_port()
    script = Path(tempfile.mkdtemp(prefix="edge-bench-")) / "spike"
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-proxy",
         json.dumps(_settings(tr, config, origin.url, port, admin)), "--spike", str(script)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    seen: list[tuple[float, float, str, int]] = []
    try:
        await asyncio.to_thread(_ready, f"http://127.0.0.1:{admin}/health", child)
        t0 = time.time() + 0.2  # the trace starts; the child learns when the spike comes
        script.write_text(f"{t0 + tr.base_s},{tr.spike_s},{tr.lead_s}")
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=512)) as cs:
            async def one(key: int) -> None:
                sent = time.time()
                async with cs.get(f"http://127.0.0.1:{port}/k/{key}") as r:
                    await r.read()
                    seen.append((sent, (time.time() - sent) * 1000,
                                 r.headers.get("X-Cache", "-"), r.status))

            tasks = []
            for t, key in tr.arrivals():
                delay = t0 + t - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(key)))
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        warmed = _metric(admin, 'loadcast_sidecar_cache_origin_requests_total{api="bench",'
                                'kind="warm"')
    finally:
        stop_process(child, 10)
        await origin.stop()
    spike0 = t0 + tr.base_s
    script.unlink(missing_ok=True)
    script.parent.rmdir()
    return _summary(seen, origin.hits, spike0, spike0 + tr.spike_s, int(warmed))


def _metric(admin: int, prefix: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _summary(seen: list[tuple[float, float, str, int]], hits: list[float], spike0: float,
             spike1: float, warmed: int) -> dict[str, Any]:
    lat = [x[1] for x in seen]
    in_spike = [x for x in seen if spike0 <= x[0] < spike1]
    served = sum(1 for x in seen if x[2] in ("HIT", "STALE"))
    return {
        "requests": len(seen), "errors": sum(1 for x in seen if x[3] != 200),
        "origin_requests": len(hits),
        "origin_in_spike": sum(1 for h in hits if spike0 <= h < spike1),
        "hit_ratio": served / len(seen) if seen else 0.0,
        "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99),
        "spike_p99_ms": _pct([x[1] for x in in_spike], 0.99), "warmed": warmed,
    }


# --------------------------------------------------------------------------- hits


def _scripted(path: Path) -> Any:
    """The scripted forecast: once ``path`` holds ``start_epoch,seconds,lead``, the spike
    is seen ``lead`` seconds ahead (peak over the horizon above capacity, the next step not
    yet), then is there; (next step, peak) as demand over capacity."""
    spike: list[float] = []

    def pressure(api: str) -> tuple[float, float]:
        if not spike:
            try:
                spike.extend(float(x) for x in path.read_text().split(","))
            except (OSError, ValueError):
                return 0.3, 0.3
        s0, dur, lead = spike
        now = time.time()
        if s0 - lead <= now < s0:
            return 0.5, 1.2
        return (1.2, 1.2) if s0 <= now < s0 + dur else (0.3, 0.3)
    return pressure


def serve_proxy(settings: dict[str, Any], spike: str | None) -> None:
    """Child mode: the built-in proxy with ``settings`` until SIGTERM; with ``spike`` (a
    file path) its forecast is scripted (:func:`_scripted`)."""
    sc_settings = SidecarSettings(**settings)

    async def run() -> None:
        sc = Sidecar(sc_settings, None, sidecar_id="bench-edge")
        if spike is not None and isinstance(sc.plane, ProxyPlane) and sc.plane.proxy.edge:
            sc.plane.proxy.edge.pressure = _scripted(Path(spike))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await sc.start()
        gc.freeze()  # as ``loadcast sidecar`` does once started
        gc.set_threshold(20_000, 50, 100)
        await stop.wait()
        await sc.stop()

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())


def _ready(url: str, child: subprocess.Popen[bytes] | None = None,
           timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if child is not None and child.poll() is not None:
            err = child.stderr.read().decode() if child.stderr else ""
            raise RuntimeError(f"the proxy exited: {err[-1500:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer in {timeout_s:g} s") from None
            time.sleep(0.1)


HIT_PLANES = ("proxy", "haproxy")
NEW_BYTES = "proxy (new bytes)"  # the proxy, every request's bytes different
NEW_BYTES_SCRIPT = Path(__file__).resolve().parent / "new_bytes.lua"


def hit_throughput(seconds: float, rounds: int) -> dict[str, Any]:
    """Requests/s of a stored hit: built-in proxy (one process) vs HAProxy (``nbthread 1``),
    both pinned to the same CPU (wrk to the others), ``rounds`` interleaved runs each (order
    rotated); beside req/s, requests per CPU-second of each server process."""
    out: dict[str, Any] = {p: [] for p in (*HIT_PLANES, NEW_BYTES)}
    server_cpus, load_cpus = split_cpus()
    out.update(connections=48, server_cpus=sorted(server_cpus),
               load_cpus=sorted(load_cpus or ()), haproxy_threads=1)
    with BackendProcess({"a": 0}) as b:
        url = b.urls["a"]
        ports = {p: free_port() for p in HIT_PLANES}
        settings = {"upstreams": [{"id": "a", "url": url, "api": "bench"}],
                    "listen_port": ports["proxy"], "admin_port": 0, "cache": {"enabled": True}}
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-proxy",
             json.dumps(settings)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        h: HAProxyProcess | None = None
        try:
            _ready(f"http://127.0.0.1:{ports['proxy']}/cached", child)
            pids = {"proxy": child.pid}
            if haproxy_binary() is not None:
                h = HAProxyProcess("")
                sock = h.dir / "admin.sock"
                h.config_path.write_text(render_config(
                    [Upstream(id="a", url=url, api="bench")], bind=f"127.0.0.1:{ports['haproxy']}",
                    socket_path=sock, threads=1, cache=EdgeCacheSettings(enabled=True)))
                h.start(sock)
                assert h.proc is not None
                pids["haproxy"] = h.proc.pid
                _ready(f"http://127.0.0.1:{ports['haproxy']}/cached")
            for pid in pids.values():
                pin(pid, server_cpus)
            planes = [*pids, NEW_BYTES]
            for r in range(rounds):
                order = planes[r % len(planes):] + planes[:r % len(planes)]
                for plane in order:
                    server = "proxy" if plane == NEW_BYTES else plane
                    script = NEW_BYTES_SCRIPT if plane == NEW_BYTES else None
                    with measured(pids[server]) as cpu:
                        res = load([f"http://127.0.0.1:{ports[server]}/cached"], seconds, 48,
                                   load_cpus, script)
                    res["cpu_s"] = cpu.seconds
                    res["per_cpu_s"] = per_cpu_second(res["requests"], cpu.seconds)
                    out[plane].append(res)
        finally:
            stop_process(child, 10)
            if h is not None:
                h.stop()
    for key in ("rps", "per_cpu_s"):
        for plane, name in (("proxy", ""), (NEW_BYTES, "new_bytes_")):
            ratios = [p[key] / q[key] for p, q in zip(out[plane], out["haproxy"],
                                                      strict=False) if q[key] > 0]
            out[f"{name}ratio_{key}"] = statistics.median(ratios) if ratios else None
            out[f"{name}ratios_{key}"] = ratios
    out["ratio"] = out["ratio_rps"]
    return out


# --------------------------------------------------------------------------- run


def run(quick: bool, only: str | None = None, rounds: int | None = None) -> dict[str, Any]:
    tr = Trace(base_s=3.0, spike_s=1.0, tail_s=0.5, max_age_s=2, swr_s=1, lead_s=1.0,
               keys=200, top_k=60) if quick else Trace()
    res: dict[str, Any] = {"quick": quick, "trace": asdict(tr), "configs": {}, "ratios": {}}
    if only in (None, "trace"):
        for config in ("no-cache", "swr", "swr+warming"):
            res["configs"][config] = _run(replay(tr, config))
        swr = res["configs"]["swr"]["origin_in_spike"]
        warm = res["configs"]["swr+warming"]["origin_in_spike"]
        res["ratios"]["spike_origin_cut_vs_swr"] = 1 - warm / swr if swr else 0.0
    if only in (None, "hits"):
        res["hits"] = hit_throughput(1.0 if quick else 5.0, rounds or (2 if quick else 7))
        res["ratios"]["proxy_vs_haproxy_hit_rps"] = res["hits"]["ratio"]
        res["ratios"]["proxy_vs_haproxy_hit_per_cpu_s"] = res["hits"]["ratio_per_cpu_s"]
    return res


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def show(res: dict[str, Any]) -> None:
    if res["configs"]:
        t = Table(title="replayed trace (Zipf keys, spike): built-in proxy")
        for col in ("config", "requests", "origin req", "origin in spike", "hit ratio",
                    "p50 ms", "p99 ms", "spike p99 ms", "warmed"):
            t.add_column(col, justify="right")
        for name, c in res["configs"].items():
            t.add_row(name, str(c["requests"]), str(c["origin_requests"]),
                      str(c["origin_in_spike"]), f"{c['hit_ratio']:.3f}",
                      f"{c['p50_ms']:.1f}", f"{c['p99_ms']:.1f}", f"{c['spike_p99_ms']:.1f}",
                      str(c["warmed"]))
        console.print(t)
    r = res["ratios"]
    if "spike_origin_cut_vs_swr" in r:
        console.print(f"warming: origin requests during the spike cut by "
                      f"{r['spike_origin_cut_vs_swr']:.0%} against SWR alone (target >= 30 %)")
    h = res.get("hits")
    if h is None:
        return
    t2 = Table(title=f"cached hit, {h['connections']} connections, servers pinned to CPU "
                     f"{h['server_cpus']} (HAProxy nbthread {h['haproxy_threads']}), wrk on "
                     f"{h['load_cpus'] or 'any'}; medians of {len(h['proxy'])} rounds")
    for col in ("data plane", "req/s", "req/CPU-s", "p99 ms", "req/s per round"):
        t2.add_column(col, justify="right")
    for plane in ("proxy", NEW_BYTES, "haproxy"):
        rows = h.get(plane)
        if not rows:
            continue
        t2.add_row(plane, f"{statistics.median(r['rps'] for r in rows):.0f}",
                   f"{statistics.median(r['per_cpu_s'] for r in rows):.0f}",
                   f"{statistics.median(r['p99_ms'] for r in rows):.1f}",
                   " / ".join(f"{r['rps']:.0f}" for r in rows))
    console.print(t2)
    ratio = r["proxy_vs_haproxy_hit_rps"]
    per = h.get("ratio_per_cpu_s")
    new = h.get("new_bytes_ratio_rps")
    console.print("cached hits proxy / haproxy: "
                  + (f"{ratio:.2f}x req/s (target >= 0.5x), {per:.2f}x req/CPU-s; "
                     f"every request's bytes new: {new:.2f}x req/s"
                     if ratio is not None and per is not None and new is not None
                     else "no haproxy"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run (what the test runs)")
    p.add_argument("--out", type=Path, default=OUT, help="where the JSON goes")
    p.add_argument("--only", choices=("trace", "hits"), help="run one of the two parts")
    p.add_argument("--rounds", type=int, help="cached-hit rounds (default 7, --quick 2)")
    p.add_argument("--serve-proxy", help=argparse.SUPPRESS)  # child: settings JSON
    p.add_argument("--spike", help=argparse.SUPPRESS)  # child: scripted forecast
    a = p.parse_args(argv)
    if a.serve_proxy is not None:
        serve_proxy(json.loads(a.serve_proxy), a.spike)
        return 0
    res = run(a.quick, a.only, a.rounds)
    show(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    console.print(f"JSON: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
