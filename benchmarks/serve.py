"""Serving forecasts: batch against single calls, a batch of 10,000, ``/v1/predict`` req/s.

The API (``streams.api.service.ApiService``, no Kafka) answers from a state of
``--endpoints`` synthetic scores (15-point forecasts with bands, fresh); every question
asks three horizons of one endpoint. Side by side in one run:

- ``1,000 single``: 1,000 ``POST /v1/predict`` calls one after the other (aiohttp client
  in the same process, keep-alive) against ``1 batch of 1,000``: one
  ``POST /v1/predict/batch`` with the same questions. Target: >= 20x fewer seconds.
- ``batch of 10,000``: one ``POST /v1/predict/batch`` of 10,000 items, client and server
  in this process (round trip: pre-encoded body sent, answer read). Target: <= 100 ms
  median.
- ``wrk``: the API in a process of its own (plain asyncio, one core at most), ``wrk``
  (Debian) posting single questions (``benchmarks/serve_post.lua``, endpoints cycled) for
  a fixed time, beside ``GET /health`` on the same server (the floor: what aiohttp alone
  costs). req/s per core = req/s / the CPU seconds per second the server process used.

Medians over ``--rounds`` rounds (the machine is shared; its speed drifts between rounds).

    python benchmarks/serve.py            # full run (about a minute)
    python benchmarks/serve.py --quick    # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from rich.console import Console
from rich.table import Table

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.support.processes import stop_process
from streams.api.config import ApiSettings
from streams.api.service import ApiService
from streams.kafka.broker import free_port

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "out" / "benchmarks" / "serve.json"
LUA = Path(__file__).resolve().parent / "serve_post.lua"
HORIZONS = [1, 6, 12]
STEP_MS = 60_000
console = Console()


def endpoint(i: int) -> str:
    return f"e-{i:06d}"


def score_record(i: int, now_ms: int) -> dict[str, Any]:
    """A fresh LoadScore record of endpoint i with 15 forecast points."""
    base = 100.0 + i % 97
    return {
        "endpoint_id": endpoint(i), "api": f"api-{i % 50}", "region": f"r{i % 5}",
        "computed_at": now_ms, "valid_until": now_ms + 3_600_000, "score": 0.5,
        "capacity_rps": 400.0, "capacity_source": "CONFIGURED", "current_rps": base,
        "predicted_utilization": 0.4, "latency_p99_ms": 20.0, "error_rate": 0.0,
        "anomaly_score": 0.0, "step_seconds": STEP_MS // 1000, "model": "default",
        "reasons": [],
        "forecast": [{"horizon": h, "at": now_ms + h * STEP_MS, "mean": base + h,
                      "lower": base + h - 10, "upper": base + h + 10} for h in range(1, 16)],
    }


def make_service(endpoints: int, port: int = 0) -> ApiService:
    """The API without Kafka, its state holding ``endpoints`` fresh scores."""
    svc = ApiService(ApiSettings(port=port, keda_enabled=False), None)  # HTTP only
    now = round(time.time() * 1000)
    svc.state.apply(("LoadScore", score_record(i, now)) for i in range(endpoints))
    return svc


def questions(n: int, endpoints: int, seed: int) -> list[dict[str, Any]]:
    return [{"endpoint_id": endpoint((seed + 7919 * k) % endpoints), "horizons": HORIZONS}
            for k in range(n)]


# --------------------------------------------------------------------------- in process


async def _post(http: aiohttp.ClientSession, url: str, body: bytes) -> bytes:
    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        out = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {out[:300]!r}")
        return out


async def _in_process(endpoints: int, rounds: int) -> dict[str, Any]:
    svc = make_service(endpoints)
    await svc.start()
    url = f"http://127.0.0.1:{svc.port}"
    singles: list[float] = []
    batches: list[float] = []
    ratios: list[float] = []
    big: list[float] = []
    big_cpu: list[float] = []
    try:
        async with aiohttp.ClientSession() as http:
            # warm: the API prepares each endpoint's curve at its first question and keeps
            # it until the next score, as a running API has
            await _post(http, url + "/v1/predict/batch",
                        json.dumps({"items": questions(endpoints, endpoints, 0)[:10_000]}
                                   ).encode())
            for r in range(rounds):
                qs = questions(1_000, endpoints, r)
                bodies = [json.dumps(q).encode() for q in qs]
                t = time.perf_counter()
                for b in bodies:
                    await _post(http, url + "/v1/predict", b)
                single = time.perf_counter() - t
                batch_body = json.dumps({"items": qs}).encode()
                t = time.perf_counter()  # both sides read the answers' bytes, no decoding
                raw_answer = await _post(http, url + "/v1/predict/batch", batch_body)
                batch = time.perf_counter() - t
                answer = json.loads(raw_answer)
                assert answer["errors"] == 0 and len(answer["results"]) == 1_000
                singles.append(single)
                batches.append(batch)
                ratios.append(single / batch)
                body10k = json.dumps({"items": questions(10_000, endpoints, r)}).encode()
                t, c = time.perf_counter(), time.process_time()
                raw = await _post(http, url + "/v1/predict/batch", body10k)
                big.append(time.perf_counter() - t)
                big_cpu.append(time.process_time() - c)
                assert raw.count(b'"index"') == 10_000
    finally:
        await svc.stop()
    return {
        "single_1000_s": statistics.median(singles), "batch_1000_s": statistics.median(batches),
        "batch_vs_single": statistics.median(ratios), "ratio_per_round": ratios,
        "batch_10000_ms": 1000 * statistics.median(big),
        "batch_10000_ms_per_round": [1000 * b for b in big],
        "batch_10000_cpu_ms": 1000 * statistics.median(big_cpu),
        "batch_10000_cpu_ms_per_round": [1000 * b for b in big_cpu],
    }


# --------------------------------------------------------------------------- wrk


def _serve(port: int, endpoints: int) -> None:
    """The child process: the API on ``port`` until SIGTERM."""
    from streams.signals import stop_on_signals

    svc = make_service(endpoints, port)
    with stop_on_signals(None) as stop:
        asyncio.run(svc.run_until(stop))


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the API process exited")
        with (contextlib.suppress(OSError),
              urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r):
            if r.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the API did not answer /health in {within_s:g} s")


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(url: str, seconds: int, connections: int, script: Path | None,
        server: psutil.Process) -> dict[str, float]:
    """One wrk run (one thread); req/s, p50/p99 and the server's CPU cores in use."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if script is not None:
        cmd += ["-s", str(script)]
    cpu0, t0 = sum(server.cpu_times()[:2]), time.monotonic()
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 30,
                         check=False).stdout
    cores = (sum(server.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk output not understood: {out[-500:]}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res = {"rps": float(m.group(1)), "cores": cores, "non2xx": int(bad.group(1)) if bad else 0}
    for q in ("50", "99"):
        mq = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        res[f"p{q}_ms"] = _ms(mq.group(1), mq.group(2)) if mq else float("nan")
    res["rps_per_core"] = res["rps"] / cores if cores > 0 else float("nan")
    return res


def _with_wrk(endpoints: int, rounds: int, seconds: int, connections: int) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        return {"skipped": "wrk not installed (make system-deps installs it)"}
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve",
                             str(port), "--endpoints", str(endpoints)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs: dict[str, list[dict[str, float]]] = {"predict": [], "health": []}
    try:
        _wait_healthy(port, proc)
        server = psutil.Process(proc.pid)
        for _ in range(rounds):
            runs["predict"].append(wrk(f"http://127.0.0.1:{port}/v1/predict", seconds,
                                       connections, LUA, server))
            runs["health"].append(wrk(f"http://127.0.0.1:{port}/health", seconds,
                                      connections, None, server))
    finally:
        stop_process(proc, 10)
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            for name, rs in runs.items()} | {"connections": connections, "seconds": seconds}


# --------------------------------------------------------------------------- report


def run(quick: bool, rounds: int, endpoints: int, seconds: int, connections: int
        ) -> dict[str, Any]:
    res: dict[str, Any] = {"quick": quick, "rounds": rounds, "endpoints": endpoints,
                           "horizons": HORIZONS, "cores": os.cpu_count(),
                           "load_average_before": os.getloadavg()[0]}
    res["in_process"] = asyncio.run(_in_process(endpoints, rounds))
    res["wrk"] = _with_wrk(endpoints, rounds, seconds, connections)
    res["load_average_after"] = os.getloadavg()[0]
    ip = res["in_process"]
    res["targets"] = {"batch_vs_single>=20": ip["batch_vs_single"] >= 20,
                      "batch_10000_ms<=100": ip["batch_10000_ms"] <= 100}
    return res


def show(res: dict[str, Any]) -> None:
    ip = res["in_process"]
    t = Table(title=f"serving forecasts (median of {res['rounds']} rounds, "
                    f"{res['endpoints']} endpoints, horizons {res['horizons']}; load average "
                    f"{res['load_average_before']:.1f} on {res['cores']} cores)")
    for c in ("case", "median", "target"):
        t.add_column(c)
    t.add_row("1,000 single POST /v1/predict", f"{ip['single_1000_s'] * 1000:.1f} ms", "")
    t.add_row("1 batch of 1,000", f"{ip['batch_1000_s'] * 1000:.1f} ms", "")
    t.add_row("single / batch (seconds)", f"{ip['batch_vs_single']:.1f}x", ">= 20x")
    t.add_row("batch of 10,000 (in process)", f"{ip['batch_10000_ms']:.1f} ms", "<= 100 ms")
    t.add_row("  its CPU time (client + server)", f"{ip['batch_10000_cpu_ms']:.1f} ms", "")
    w = res["wrk"]
    if "skipped" in w:
        t.add_row("wrk", w["skipped"], "")
    else:
        for name, route in (("predict", "POST /v1/predict"), ("health", "GET /health")):
            r = w[name]
            t.add_row(f"wrk {route} ({w['connections']} conn.)",
                      f"{r['rps']:.0f} req/s on {r['cores']:.2f} cores = "
                      f"{r['rps_per_core']:.0f} req/s per core; p50 {r['p50_ms']:.2f} ms, "
                      f"p99 {r['p99_ms']:.2f} ms", "")
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="one short round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--endpoints", type=int, default=10_000)
    p.add_argument("--seconds", type=int, default=5, help="wrk duration per run")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    a = p.parse_args(argv)
    if a.serve is not None:
        _serve(a.serve, a.endpoints)
        return 0
    if a.quick:
        a.rounds, a.seconds = 1, 1
    res = run(a.quick, a.rounds, a.endpoints, a.seconds, a.connections)
    show(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    console.print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
