"""Data-plane throughput and score-to-weight latency of the routing sidecar.

Side by side in one run, against the same three loopback upstreams (aiohttp servers in
processes of their own), with the same load generator (``wrk`` from Debian when installed:
fixed connections for a fixed time, so bounded in count and time; else a Python one):

- ``direct``: the three upstreams hit directly (one wrk per upstream, in parallel);
- ``haproxy``: plain HAProxy (same config the sidecar writes, equal weights, no sidecar);
- ``haproxy+sidecar``: HAProxy started and driven by ``loadcast sidecar`` while scores
  arrive every 500 ms and the sidecar pushes weights;
- ``proxy``: the built-in proxy (``loadcast sidecar --data-plane proxy``, uvloop).

Saturated backends (issue 14): three single-threaded ``python -m http.server`` upstreams
(accept queue 5) that saturate far below the load of ``wrk`` with 50 connections; 2xx/s and
non-2xx side by side for plain HAProxy (a hand-written stock config), the sidecar-driven
HAProxy and the built-in proxy, while the sidecars receive a new user's scores (no
capacity configured or learned). Target: sidecar-driven >= 0.95x plain in 2xx/s with no
more non-2xx.

Then score published -> weight live for both data planes: publish scores that send all
traffic to one endpoint, and time until the first request through the data plane is
answered by that endpoint (a tight sequential request loop; resolution ~1 request).

Ratios: proxy / haproxy requests/s (target >= 0.25), haproxy+sidecar / haproxy (>= 0.95),
score->live p99 for HAProxy (<= 50 ms). The four configurations run back to back in each
round (order rotated per round); ratios are medians of the per-round ratios, because the
machine is shared and its speed drifts between rounds.

    python benchmarks/proxy.py            # full run (about 3 minutes)
    python benchmarks/proxy.py --quick    # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from confluent_kafka import Producer
from rich.console import Console
from rich.table import Table

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.support.cpu import measured, per_cpu_second, pin, split_cpus
from benchmarks.support.processes import sidecar_process
from schemas.codec import Codec
from streams.kafka.broker import EmbeddedBroker, free_port
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import ensure_topics, topic_name
from streams.sidecar.config import Upstream
from streams.sidecar.haproxy import HAProxyProcess, haproxy_binary, render_config
from streams.sidecar.testing import BackendProcess, score_record

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "benchmarks" / "proxy.json"
API = "bench"
IDS = ("a", "b", "c")
console = Console()


# --------------------------------------------------------------------------- load


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(urls: list[str], seconds: float, connections: int,
        cpus: set[int] | None = None, script: Path | None = None) -> dict[str, float]:
    """Run wrk on each URL in parallel (connections split between them; on ``cpus`` when
    given; with the Lua ``script`` when given); summed req/s and requests, the worst
    p50/p99 of the runs."""
    procs = []
    per = max(1, connections // len(urls))
    extra = ["-s", str(script)] if script is not None else []
    for url in urls:
        procs.append(subprocess.Popen(
            ["wrk", "-t1", f"-c{per}", f"-d{max(1, round(seconds))}s", "--latency",
             "--timeout", "5s", *extra, url],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        ))
    rps = 0.0
    requests = 0
    ok_rps = 0.0
    p50: list[float] = []
    p99: list[float] = []
    errors = 0
    non2xx = 0
    socket_errors = 0
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 30)
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        mt = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
        if m is None or mt is None:
            raise RuntimeError(f"wrk output not understood: {out[-500:]}")
        rps += float(m.group(1))
        requests += int(mt.group(1))
        me = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        bad = int(me.group(1)) if me else 0
        non2xx += bad
        ok_rps += (int(mt.group(1)) - bad) / (_ms(mt.group(2), mt.group(3)) / 1000)
        for q, into in (("50", p50), ("99", p99)):
            mq = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
            if mq:
                into.append(_ms(mq.group(1), mq.group(2)))
        errors += bad
        ms = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
        socket_errors += sum(int(x) for x in ms.groups()) if ms else 0
    return {"rps": rps, "ok_rps": ok_rps, "requests": requests,
            "p50_ms": max(p50, default=float("nan")),
            "p99_ms": max(p99, default=float("nan")), "errors": errors + socket_errors,
            "non2xx": non2xx, "socket_errors": socket_errors}


async def _py_load(urls: list[str], seconds: float, connections: int) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as cs:
        async def worker(url: str) -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                t = time.perf_counter()
                async with cs.get(url) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                lat.append((time.perf_counter() - t) * 1000)

        await asyncio.gather(*(worker(urls[i % len(urls)]) for i in range(connections)))
    lat.sort()
    return {"rps": len(lat) / seconds, "ok_rps": (len(lat) - errors) / seconds,
            "requests": len(lat),
            "p50_ms": lat[len(lat) // 2], "p99_ms": lat[int(len(lat) * 0.99)],
            "errors": errors, "non2xx": errors, "socket_errors": 0}


def load(urls: list[str], seconds: float, connections: int,
         cpus: set[int] | None = None, script: Path | None = None) -> dict[str, float]:
    """Closed-loop load for ``seconds`` with ``connections`` connections (wrk on ``cpus``
    when given; ``script``: a wrk Lua script, ignored by the Python generator)."""
    if shutil.which("wrk"):
        return wrk(urls, seconds, connections, cpus, script)
    return asyncio.run(_py_load(urls, seconds, connections))


# --------------------------------------------------------------------------- parts


class ScorePublisher:
    """Publishes LoadScore records for the benchmark's upstreams."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.codec = Codec.embedded()
        self.topic = topic_name(kafka, "load-scores")
        self.producer = Producer({"bootstrap.servers": kafka.bootstrap_servers,
                                  "linger.ms": 0, "acks": 1})

    def publish(self, scores: dict[str, float], valid_s: float = 30.0) -> None:
        for e, s in scores.items():
            # A configured capacity far above what loopback can offer: these sections
            # measure routing overhead, not shedding (which a real capacity would start).
            rec = score_record(e, s, api=API, valid_for_s=valid_s, capacity_rps=1e6)
            self.producer.produce(self.topic, self.codec.encode("LoadScore", rec), e.encode())
        self.producer.flush(5)

    def publish_records(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            self.producer.produce(self.topic, self.codec.encode("LoadScore", rec),
                                  str(rec["endpoint_id"]).encode())
        self.producer.flush(5)


def default_scores(n: int) -> list[dict[str, Any]]:
    """What the scoring processor publishes for a new user's endpoints: no configured or
    learned capacity (``DEFAULT`` 100 rps) and a measured load far above it."""
    return [{**score_record(e, 0.05 + 0.01 * ((n + i) % 3), api=API, valid_for_s=30,
                            predicted_utilization=6.0, capacity_rps=100.0),
             "capacity_source": "DEFAULT", "current_rps": 600.0}
            for i, e in enumerate(IDS)]


async def _score_to_live(pub: ScorePublisher, port: int, samples: int) -> list[float]:
    """ms from publishing 'all traffic to X' to the first response from X."""
    out: list[float] = []
    url = f"http://127.0.0.1:{port}/x"
    async with aiohttp.ClientSession() as cs:
        for i in range(samples + 1):
            target = IDS[i % len(IDS)]
            scores = {e: (1.0 if e == target else 0.0) for e in IDS}
            t0 = time.perf_counter()
            pub.publish(scores)
            deadline = t0 + 5.0
            while time.perf_counter() < deadline:
                async with cs.get(url) as r:
                    await r.read()
                    if r.headers.get("X-Endpoint") == target:
                        break
            else:
                raise RuntimeError(f"weights never went live for {target}")
            if i > 0:  # the first one also warms up the consumer: not counted
                out.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.1)
    return out


async def _under_scores(pub: ScorePublisher, url: str, seconds: float,
                        connections: int) -> dict[str, float]:
    """Load ``url`` while new scores arrive every 500 ms (the sidecar keeps working)."""
    stop = asyncio.Event()

    async def keep_scoring() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            pub.publish({"a": 0.5 + 0.01 * (n % 3), "b": 0.5, "c": 0.5 - 0.01 * (n % 3)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    task = asyncio.create_task(keep_scoring())
    try:
        return await asyncio.to_thread(load, [url], seconds, connections)
    finally:
        stop.set()
        await task


def score_to_live(kafka: KafkaSettings, port: int, samples: int) -> list[float]:
    return asyncio.run(_score_to_live(ScorePublisher(kafka), port, samples))


def plain_haproxy(ups: list[Upstream], seconds: float, connections: int) -> dict[str, float]:
    """HAProxy alone, with the config the sidecar writes (equal weights)."""
    port = free_port()
    h = HAProxyProcess("")
    sock = h.dir / "admin.sock"
    h.config_path.write_text(render_config(ups, bind=f"127.0.0.1:{port}", socket_path=sock))
    h.start(sock)
    try:
        return load([f"http://127.0.0.1:{port}/x"], seconds, connections)
    finally:
        h.stop()


def plain_config(ups: list[Upstream], bind: str, socket_path: Path) -> str:
    """The HAProxy config a user writes by hand: round robin, stock timeouts, no checks."""
    lines = ["global", f"    stats socket {socket_path} mode 600 level admin",
             "    maxconn 4096", "", "defaults", "    mode http", "    timeout connect 5s",
             "    timeout client 30s", "    timeout server 30s", "", "frontend fe",
             f"    bind {bind}", f"    default_backend be_{API}", "", f"backend be_{API}",
             "    balance roundrobin"]
    lines += [f"    server {u.id} {u.host}:{u.port}" for u in ups]
    return "\n".join(lines) + "\n"


def user_haproxy(ups: list[Upstream], seconds: float, connections: int) -> dict[str, float]:
    """HAProxy alone with :func:`plain_config`."""
    port = free_port()
    h = HAProxyProcess("")
    sock = h.dir / "admin.sock"
    h.config_path.write_text(plain_config(ups, f"127.0.0.1:{port}", sock))
    h.start(sock)
    try:
        return load([f"http://127.0.0.1:{port}/x"], seconds, connections)
    finally:
        h.stop()


@contextmanager
def stdlib_backends(n: int) -> Iterator[list[str]]:
    """``n`` single-threaded upstreams as a new user starts them (``python -m http.server``:
    one connection at a time, HTTP/1.0, accept queue of 5): they saturate far below 50
    connections' load and their accept queues overflow. Yields their base URLs."""
    www = Path(tempfile.mkdtemp(prefix="loadcast-bench-www-"))
    (www / "x").write_text("x\n")
    ports = [free_port() for _ in range(n)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(p),
         "--directory", str(www)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True) for p in ports]
    try:
        deadline = time.monotonic() + 20
        for p in ports:
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", p), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("http.server backends did not start") from None
                    time.sleep(0.05)
        yield [f"http://127.0.0.1:{p}" for p in ports]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(www, ignore_errors=True)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


# --------------------------------------------------------------------------- run


SAT_PLANES = ("haproxy", "haproxy+sidecar", "proxy")


def saturated(kafka: KafkaSettings, ups: list[Upstream], pub: ScorePublisher,
               slices: int, seconds: float, connections: int) -> dict[str, list[dict[str, float]]]:
    """The saturation case: plain HAProxy (:func:`plain_config`), a sidecar driving
    HAProxy and a sidecar with the built-in proxy run at the same time in front of the
    three single-threaded backends (``ups``, from :func:`stdlib_backends`), while both
    sidecars receive a new user's scores (DEFAULT capacity) every 500 ms. ``wrk`` with
    ``connections`` connections then loads each data plane in turn for ``seconds``,
    ``slices`` times (order rotated each time): the three runs of a slice are seconds
    apart, so the shared machine's drift hardly enters their ratio, and every data plane
    runs with the same processes in the background."""
    out: dict[str, list[dict[str, float]]] = {k: [] for k in SAT_PLANES}
    ports = {k: free_port() for k in SAT_PLANES}
    stop = threading.Event()

    def keep_scoring() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            pub.publish_records(default_scores(n))
            stop.wait(0.5)

    h = HAProxyProcess("")
    sock = h.dir / "admin.sock"
    h.config_path.write_text(plain_config(ups, f"127.0.0.1:{ports['haproxy']}", sock))
    scorer = threading.Thread(target=keep_scoring, name="bench-scores", daemon=True)
    with contextlib.ExitStack() as stack:
        h.start(sock)
        stack.callback(h.stop)
        stack.enter_context(sidecar_process(kafka, ups, "haproxy", ports["haproxy+sidecar"],
                                            sidecar_id="bench-haproxy"))
        stack.enter_context(sidecar_process(kafka, ups, "proxy", ports["proxy"],
                                            sidecar_id="bench-proxy"))
        scorer.start()
        stack.callback(scorer.join, 10)
        stack.callback(stop.set)
        time.sleep(1.0)  # the scores are in before the load starts
        for i in range(slices):
            order = list(SAT_PLANES[i % 3:] + SAT_PLANES[:i % 3])
            for key in order:
                out[key].append(load([f"http://127.0.0.1:{ports[key]}/x"], seconds,
                                     connections))
    return out


CORE_PLANES = ("haproxy", "proxy", "proxy+edge")
# cache, compression and rate limits on, none triggered by this load: /x is not
# cacheable (no Cache-Control), wrk sends no Accept-Encoding, the rate is far above it
EDGE_ENV = {"LOADCAST_SIDECAR__CACHE__ENABLED": "true",
            "LOADCAST_SIDECAR__COMPRESSION__ENABLED": "true",
            "LOADCAST_SIDECAR__RATE_LIMIT__ENABLED": "true",
            "LOADCAST_SIDECAR__RATE_LIMIT__BASE_RPS": "1000000"}


def same_core(kafka: KafkaSettings, ups: list[Upstream], slices: int, seconds: float,
              connections: int) -> dict[str, Any]:
    """The data planes on the same CPU budget: plain HAProxy with ``nbthread 1`` (the
    sidecar's config), the built-in proxy, and the built-in proxy with cache, compression
    and rate limits enabled but not triggered, each pinned to the same CPU (wrk to the
    others), ``slices`` interleaved runs (order rotated); req/s and requests per
    CPU-second of the server process, ratios per slice."""
    server_cpus, load_cpus = split_cpus()
    out: dict[str, Any] = {k: [] for k in CORE_PLANES}
    ports = {k: free_port() for k in CORE_PLANES}
    h = HAProxyProcess("")
    sock = h.dir / "admin.sock"
    h.config_path.write_text(render_config(ups, bind=f"127.0.0.1:{ports['haproxy']}",
                                           socket_path=sock, threads=1))
    with contextlib.ExitStack() as stack:
        h.start(sock)
        stack.callback(h.stop)
        assert h.proc is not None
        pids = {"haproxy": h.proc.pid}
        for key, env in (("proxy", None), ("proxy+edge", EDGE_ENV)):
            started: list[int] = []
            stack.enter_context(sidecar_process(kafka, ups, "proxy", ports[key], env=env,
                                                sidecar_id=f"bench-{key}", pids=started))
            pids[key] = started[0]
        for pid in pids.values():
            pin(pid, server_cpus)
        for i in range(slices):
            for key in CORE_PLANES[i % 3:] + CORE_PLANES[:i % 3]:
                with measured(pids[key]) as cpu:
                    r = load([f"http://127.0.0.1:{ports[key]}/x"], seconds, connections,
                             load_cpus)
                r["cpu_s"] = cpu.seconds
                r["per_cpu_s"] = per_cpu_second(r["requests"], cpu.seconds)
                out[key].append(r)
    res: dict[str, Any] = {"server_cpus": sorted(server_cpus), "haproxy_threads": 1,
                           "load_cpus": sorted(load_cpus or ()), "slices": slices,
                           "seconds": seconds, "connections": connections, "raw": out}
    res["planes"] = {k: {m: statistics.median(r[m] for r in v)
                         for m in ("rps", "per_cpu_s", "p99_ms")} | {
                             "errors": sum(r["errors"] for r in v)} for k, v in out.items()}
    for k in ("proxy", "proxy+edge"):
        for m in ("rps", "per_cpu_s"):
            per = [a[m] / b[m] for a, b in zip(out[k], out["haproxy"], strict=True) if b[m]]
            res[f"{k}_vs_haproxy_{m}_per_slice"] = per
            res[f"{k}_vs_haproxy_{m}"] = statistics.median(per) if per else 0.0
    return res


def run(quick: bool, rounds: int, seconds: float, connections: int, samples: int,
        sat_seconds: float = 3.0, sat_connections: int = 50, only: str | None = None,
        core_slices: int | None = None) -> dict[str, Any]:
    if haproxy_binary() is None:
        raise SystemExit("haproxy is not installed: make system-deps")
    results: dict[str, list[dict[str, float]]] = {
        "direct": [], "haproxy": [], "haproxy+sidecar": [], "proxy": []}
    sat: dict[str, list[dict[str, float]]] = {k: [] for k in SAT_PLANES}
    sat_slices = max(3, rounds * 2)
    live: dict[str, list[float]] = {"haproxy+sidecar": [], "proxy": []}
    backends = [BackendProcess({e: 0}) for e in IDS]
    with EmbeddedBroker() as broker, stdlib_backends(len(IDS)) as slow_urls:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap,
                              topic_prefix=f"bench{uuid.uuid4().hex[:6]}.", partitions=3)
        ensure_topics(kafka)
        try:
            for b in backends:
                b.start()
            ups = [Upstream(id=e, url=b.urls[e], api=API) for e, b in zip(IDS, backends,
                                                                         strict=True)]
            direct_urls = [f"{u.url}/x" for u in ups]
            slow_ups = [Upstream(id=e, url=u, api=API) for e, u in zip(IDS, slow_urls,
                                                                      strict=True)]
            pub = ScorePublisher(kafka)
            pub.publish({"a": 0.5, "b": 0.5, "c": 0.5})
            n_core = core_slices or max(3, rounds * 2 + 1)
            console.print(f"same CPU: {n_core} slices")
            cores = same_core(kafka, ups, n_core, seconds, connections)
            if only == "cores":
                return {"quick": quick, "cores": cores, "cpus": os.cpu_count(),
                        "generator": "wrk" if shutil.which("wrk") else "python"}
            for r in range(rounds):
                console.print(f"round {r + 1}/{rounds}")
                # rotate the order each round: no configuration always runs first or last
                order = ["direct", "haproxy", "haproxy+sidecar", "proxy"]
                order = order[r % 4:] + order[:r % 4]
                for key in order:
                    if key == "direct":
                        results[key].append(load(direct_urls, seconds, connections))
                    elif key == "haproxy":
                        results[key].append(plain_haproxy(ups, seconds, connections))
                    else:
                        plane = "haproxy" if key == "haproxy+sidecar" else "proxy"
                        port = free_port()
                        with sidecar_process(kafka, ups, plane, port, sidecar_id=f"bench-{plane}"):
                            pub.publish({"a": 0.5, "b": 0.5, "c": 0.5})
                            results[key].append(asyncio.run(_under_scores(
                                pub, f"http://127.0.0.1:{port}/x", seconds, connections)))
                            live[key] += score_to_live(kafka, port, samples)
            console.print(f"saturated backends: {sat_slices} slices")
            sat = saturated(kafka, slow_ups, pub, sat_slices, sat_seconds, sat_connections)
        finally:
            for b in backends:
                b.stop()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p50_ms", "p99_ms")}
           | {"errors": sum(r["errors"] for r in v)} for k, v in results.items()}
    lat = {k: {"p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99), "max_ms": max(v), "n": len(v)}
           for k, v in live.items()}
    # The machine is shared and noisy: compare within each round (the four runs of a
    # round are seconds apart), then take the median of the per-round ratios.
    def per_round(a: str, b: str) -> list[float]:
        return [x["rps"] / y["rps"] for x, y in zip(results[a], results[b], strict=True)]

    raw_ratios = {
        "proxy_vs_haproxy_rps": per_round("proxy", "haproxy"),
        "sidecar_haproxy_vs_haproxy_rps": per_round("haproxy+sidecar", "haproxy"),
        "haproxy_vs_direct_rps": per_round("haproxy", "direct"),
    }
    ratios = {k: statistics.median(v) for k, v in raw_ratios.items()}
    sat_med = {k: {"ok_rps": statistics.median(x["ok_rps"] for x in v),
                   "non2xx": statistics.median(x["non2xx"] for x in v),
                   "socket_errors": statistics.median(x["socket_errors"] for x in v),
                   "non2xx_total": sum(x["non2xx"] for x in v),
                   "p99_ms": statistics.median(x["p99_ms"] for x in v)}
               for k, v in sat.items()}
    sat_ratio = {k: [x["ok_rps"] / y["ok_rps"] for x, y in zip(sat[k], sat["haproxy"],
                                                              strict=True)]
                 for k in ("haproxy+sidecar", "proxy")}
    saturation: dict[str, Any] = {
        "connections": sat_connections, "seconds": sat_seconds, "slices": sat_slices,
        "planes": sat_med,
        "slices_raw": sat, "ok_rps_vs_haproxy_per_slice": sat_ratio,
        "ok_rps_vs_haproxy": {k: statistics.median(v) for k, v in sat_ratio.items()},
    }
    ratios["sidecar_haproxy_vs_haproxy_ok_rps_saturated"] = \
        saturation["ok_rps_vs_haproxy"]["haproxy+sidecar"]
    ratios["proxy_edge_vs_haproxy_1t_rps_same_cpu"] = cores["proxy+edge_vs_haproxy_rps"]
    ratios["proxy_edge_vs_haproxy_1t_per_cpu_s"] = cores["proxy+edge_vs_haproxy_per_cpu_s"]
    return {"saturation": saturation, "cores": cores, "quick": quick, "rounds": rounds,
            "seconds": seconds, "connections": connections,
            "generator": "wrk" if shutil.which("wrk") else "python", "cpus": os.cpu_count(),
            "throughput": med, "rounds_raw": results, "score_to_live": lat,
            "score_to_live_raw_ms": live, "ratios": ratios, "ratios_per_round": raw_ratios,
            "targets": {"proxy_vs_haproxy_rps": ">= 0.25",
                        "sidecar_haproxy_vs_haproxy_rps": ">= 0.95",
                        "sidecar_haproxy_vs_haproxy_ok_rps_saturated":
                            ">= 0.95, non-2xx no more than plain haproxy",
                        "haproxy_score_to_live_p99_ms": "<= 50"}}


def show_cores(c: dict[str, Any]) -> None:
    t = Table(title=f"same CPU: servers pinned to CPU {c['server_cpus']} (HAProxy nbthread "
                    f"{c['haproxy_threads']}), wrk on {c['load_cpus'] or 'any'}, "
                    f"{c['connections']} connections, {c['seconds']}s x {c['slices']} "
                    "interleaved slices, medians")
    for col in ("data plane", "req/s", "req/CPU-s", "p99 ms", "errors",
                "req/s / haproxy", "req/CPU-s / haproxy"):
        t.add_column(col, justify="right")
    for k, v in c["planes"].items():
        t.add_row(k, f"{v['rps']:.0f}", f"{v['per_cpu_s']:.0f}", f"{v['p99_ms']:.2f}",
                  str(v["errors"]),
                  f"{c[f'{k}_vs_haproxy_rps']:.2f}x" if k != "haproxy" else "1x",
                  f"{c[f'{k}_vs_haproxy_per_cpu_s']:.2f}x" if k != "haproxy" else "1x")
    console.print(t)
    per = [round(x, 2) for x in c["proxy+edge_vs_haproxy_rps_per_slice"]]
    console.print(f"same CPU: proxy+edge / haproxy(1 thread) = "
                  f"{c['proxy+edge_vs_haproxy_rps']:.2f}x req/s (target >= 0.25; per slice "
                  f"{per}), {c['proxy+edge_vs_haproxy_per_cpu_s']:.2f}x req/CPU-s; proxy / "
                  f"haproxy = {c['proxy_vs_haproxy_rps']:.2f}x req/s, "
                  f"{c['proxy_vs_haproxy_per_cpu_s']:.2f}x req/CPU-s")


def show(res: dict[str, Any]) -> None:
    if "throughput" not in res:
        show_cores(res["cores"])
        return
    t = Table(title=f"data planes, {res['connections']} connections, {res['seconds']}s x "
                    f"{res['rounds']} rounds ({res['generator']}), medians")
    for col in ("data plane", "req/s", "p50 ms", "p99 ms", "errors", "req/s / haproxy"):
        t.add_column(col, justify="right")
    base = res["throughput"]["haproxy"]["rps"]
    for k, v in res["throughput"].items():
        t.add_row(k, f"{v['rps']:.0f}", f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}",
                  str(v["errors"]), f"{v['rps'] / base:.2f}x")
    console.print(t)
    t2 = Table(title="score published -> weight live (first request to the new endpoint)")
    for col in ("data plane", "n", "p50 ms", "p99 ms", "max ms"):
        t2.add_column(col, justify="right")
    for k, v in res["score_to_live"].items():
        t2.add_row(k, str(v["n"]), f"{v['p50_ms']:.1f}", f"{v['p99_ms']:.1f}",
                   f"{v['max_ms']:.1f}")
    console.print(t2)
    sat = res["saturation"]
    t3 = Table(title=f"saturated backends: 3 single-threaded loopback upstreams, "
                     f"{sat['connections']} connections, {sat['seconds']}s x {sat['slices']} "
                     f"slices, new user's scores (no capacity known), medians")
    for col in ("data plane", "2xx/s", "non-2xx", "socket errors", "p99 ms",
                "2xx/s / haproxy"):
        t3.add_column(col, justify="right")
    base_ok = sat["planes"]["haproxy"]["ok_rps"]
    for k, v in sat["planes"].items():
        t3.add_row(k, f"{v['ok_rps']:.0f}", f"{v['non2xx']:.0f}", f"{v['socket_errors']:.0f}",
                   f"{v['p99_ms']:.1f}", f"{v['ok_rps'] / base_ok:.2f}x" if base_ok else "-")
    console.print(t3)
    r = res["ratios"]
    console.print("ratios: medians of per-round ratios "
                  + ", ".join(f"{k}: {[round(x, 2) for x in v]}"
                              for k, v in res["ratios_per_round"].items()))
    console.print(f"proxy / haproxy = {r['proxy_vs_haproxy_rps']:.2f}x (target >= 0.25); "
                  f"haproxy+sidecar / haproxy = {r['sidecar_haproxy_vs_haproxy_rps']:.2f}x "
                  f"(target >= 0.95); haproxy score->live p99 = "
                  f"{res['score_to_live']['haproxy+sidecar']['p99_ms']:.1f} ms (target <= 50)")
    per = [round(x, 2) for x in sat["ok_rps_vs_haproxy_per_slice"]["haproxy+sidecar"]]
    console.print(f"saturated: haproxy+sidecar / haproxy 2xx/s = "
                  f"{r['sidecar_haproxy_vs_haproxy_ok_rps_saturated']:.2f}x (target >= 0.95, "
                  f"per slice {per}); "
                  f"non-2xx in all slices: "
                  + ", ".join(f"{k} {v['non2xx_total']}" for k, v in sat["planes"].items()))
    show_cores(res["cores"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="one short round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--connections", type=int, default=48)
    p.add_argument("--samples", type=int, default=40, help="score->live samples per plane")
    p.add_argument("--sat-seconds", type=float, default=3.0,
                   help="wrk duration of the saturated-backends case")
    p.add_argument("--sat-connections", type=int, default=50)
    p.add_argument("--only", choices=("cores",), help="only the same-CPU comparison")
    p.add_argument("--core-slices", type=int, help="same-CPU slices (default 2 x rounds + 1)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.seconds, a.samples, a.sat_seconds = 1, 1.0, 5, 1.0
    res = run(a.quick, a.rounds, a.seconds, a.connections, a.samples, a.sat_seconds,
              a.sat_connections, a.only, a.core_slices)
    show(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    console.print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
