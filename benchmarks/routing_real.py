"""``benchmarks/routing.py --real``: the simulated arrivals through the real sidecar.

The same kind of run as the simulation, with nothing simulated between the client and
the backends:

- **backends**: aiohttp servers on 127.0.0.1 (one child process), each with worker slots
  (an ``asyncio.Semaphore``), a bounded queue (full: 503 at once), log-normal service
  times (``asyncio.sleep``), queued requests past the client's deadline dropped (503); one
  backend degrades (service x ``degrade_factor``) for a while;
- **sidecar**: ``loadcast sidecar`` in a subprocess with the policy under test, on the
  built-in proxy and on HAProxy driven by the sidecar (HAProxy balances as
  ``streams.sidecar.haproxy.haproxy_balance`` says: ``roundrobin`` for ``round-robin``,
  ``leastconn`` for ``least-request``, and ``leastconn`` weighted by the scores for
  ``predictive``; the other per-request policies are the built-in proxy's);
- **client**: open-loop Poisson arrivals (the simulator's ``LoadShape.arrivals``, same
  seed), a spike x ``spike_factor``, a 1 s deadline;
- **predictive**: scores reach the sidecar over Kafka (embedded broker) from the project's
  own code: the edge agent's ``TelemetryAggregator`` on what the client observed, and
  ``processors.endpoint.EndpointModel`` per endpoint, every ``interval_s``.

Then the simulator runs the same scenario (same backends, arrivals, spike and
degradation) and both tables are printed side by side, with the policy order per phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchmarks.routing_sim.backends import BackendSpec, ServiceTime, Slowdown  # noqa: E402
from benchmarks.routing_sim.control import PredictiveConfig, PredictiveControl  # noqa: E402
from benchmarks.routing_sim.engine import OK, SimConfig, Simulation  # noqa: E402
from benchmarks.routing_sim.loadshape import LoadShape, Spike  # noqa: E402
from benchmarks.support.processes import sidecar_process, stop_process  # noqa: E402

API = "api"
PROXY_POLICIES = ("round-robin", "peak-ewma", "prequal", "predictive")
HAPROXY_POLICIES = ("round-robin", "least-request", "predictive")
SIM_POLICIES = ("round-robin", "least-request", "peak-ewma", "prequal", "predictive")
#: Policies whose p99 differ by less than this share count as tied in the order check
#: (one seed of a few thousand requests: peak-ewma and prequal trade places by chance).
TIE = 0.10


@dataclass
class RealScenario:
    """Small enough for a shared 2-core machine: ~60-130 requests/s."""

    slots: tuple[int, ...] = (8, 6, 4, 2)
    median_s: float = 0.1
    sigma: float = 0.4
    queue_per_slot: int = 4
    deadline_s: float = 1.0
    base_util: float = 0.35
    spike: tuple[float, float] = (20.0, 35.0)
    spike_factor: float = 2.0
    degrade: tuple[float, float] = (45.0, 60.0)
    degrade_backend: int = 1
    degrade_factor: float = 4.0
    duration_s: float = 70.0
    interval_s: float = 2.0

    def specs(self) -> list[BackendSpec]:
        svc = ServiceTime("lognormal", self.median_s, self.sigma)
        return [BackendSpec(f"r{i}", s, svc, self.queue_per_slot * s)
                for i, s in enumerate(self.slots)]

    def capacity(self) -> float:
        return sum(b.capacity_rps for b in self.specs())

    def load(self) -> LoadShape:
        base = LoadShape.constant(self.base_util * self.capacity(), self.duration_s)
        return base.with_spikes([Spike(*self.spike, self.spike_factor)])

    def phases(self) -> dict[str, list[tuple[float, float]]]:
        s0, s1 = self.spike
        d0, d1 = self.degrade
        return {"steady": [(5.0, s0), (s1 + 5, d0)], "spike": [(s0, s1 + 5)],
                "degraded": [(d0, d1 + 5)]}


# -- backends (child process: benchmarks/routing_sim/real_backends.py) -----------------


@contextmanager
def backends(sc: RealScenario, t0: float) -> Iterator[dict[str, str]]:
    """The loopback backends in a child process; yields {id: url}. Stopped on exit."""
    from streams.kafka.broker import free_port

    specs = sc.specs()
    spec: dict[str, Any] = {"deadline_s": sc.deadline_s, "t0": t0, "backends": [
        {"id": b.id, "port": free_port(), "slots": b.slots, "queue": b.queue_limit,
         "median_s": sc.median_s, "sigma": sc.sigma,
         "slow": ([sc.degrade[0], sc.degrade[1], sc.degrade_factor]
                  if i == sc.degrade_backend else None)}
        for i, b in enumerate(specs)]}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.routing_sim.real_backends",
                             json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("backends did not start")
        yield {b["id"]: f"http://127.0.0.1:{b['port']}" for b in spec["backends"]}
    finally:
        stop_process(proc, 10)


# -- sidecar ----------------------------------------------------------------------------


def sidecar(kafka: Any, upstreams: list[Any], plane: str, policy: str,
            port: int) -> contextlib.AbstractContextManager[int]:
    """``loadcast sidecar`` with ``policy``; yields its admin port once healthy."""
    return sidecar_process(
        kafka, upstreams, plane, port, sidecar_id=f"real-{plane}-{policy}",
        env={"LOADCAST_SIDECAR__POLICY": policy,
             "LOADCAST_SIDECAR__FALLBACK_POLICY":
                 "peak-ewma" if policy == "predictive" else policy},
        healthy_within_s=40, poll_s=0.2)


# -- scores (predictive) ----------------------------------------------------------------


class Scorer:
    """The edge agent's windows and the processor's EndpointModel on what the client
    saw; LoadScores published to Kafka for the sidecar. Runs in a process of its own
    (:func:`scorer_process`): River models must not stall the client's event loop."""

    def __init__(self, bootstrap: str, prefix: str, sc: RealScenario) -> None:
        from confluent_kafka import Producer

        from processors.endpoint import EndpointModel, ProcessorConfig
        from schemas.codec import Codec
        from streams.edge.agent import TelemetryAggregator
        from streams.kafka.settings import KafkaSettings
        from streams.kafka.topics import topic_name

        ids = [b.id for b in sc.specs()]
        self.agg = TelemetryAggregator("real-agent", "central", interval_seconds=sc.interval_s,
                                       endpoint_apis=dict.fromkeys(ids, API),
                                       idle_windows=10**6)
        cfg = ProcessorConfig(forecaster="default", step_seconds=2, season_seconds=600,
                              horizon=5, lateness_seconds=sc.interval_s,
                              capacity_rps={b.id: b.capacity_rps for b in sc.specs()})
        self.models = {i: EndpointModel.create(i, cfg) for i in ids}
        self.codec = Codec.embedded()
        kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix, partitions=1)
        self.topic = topic_name(kafka, "load-scores")
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": 1})
        self.pos = 0
        self.published = 0

    def record(self, endpoint: str, ms: float, status: int, timed_out: bool,
               at: float) -> None:
        self.agg.record(endpoint, ms, status, at=at, timed_out=timed_out)

    def tick(self) -> None:
        now = time.time()
        for w in self.agg.close_due(now):
            self.pos += 1
            obs = self.models[w["endpoint_id"]].observe(w, position=(self.pos, 0), now=now)
            if obs.publish and obs.score is not None:
                self.producer.produce(self.topic, self.codec.encode("LoadScore", obs.score),
                                      w["endpoint_id"].encode())
                self.published += 1
        self.producer.flush(2)


def scorer_process(bootstrap: str, prefix: str, sc: RealScenario, q: Any, out: Any) -> None:
    """Child process: records from ``q`` (None ends), a tick every 0.5 s; puts the number
    of scores published on ``out`` at the end."""
    import queue

    s = Scorer(bootstrap, prefix, sc)
    out.put("ready")
    nxt = time.monotonic() + 0.5
    while True:
        try:
            item = q.get(timeout=max(0.0, nxt - time.monotonic()))
        except queue.Empty:
            item = ()
        if item is None:
            break
        if item:
            s.record(*item)
        if time.monotonic() >= nxt:
            s.tick()
            nxt = time.monotonic() + 0.5
    out.put(s.published)


@contextmanager
def scorer(kafka: Any, sc: RealScenario) -> Iterator[tuple[Any, list[int]]]:
    """The scorer process; yields (its queue, [scores published] filled on exit)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q, out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=scorer_process,
                       args=(kafka.bootstrap_servers, kafka.topic_prefix, sc, q, out),
                       daemon=True)
    proc.start()
    published: list[int] = []
    try:
        if out.get(timeout=120) != "ready":
            raise RuntimeError("scorer did not start")
        yield q, published
    finally:
        q.put(None)
        with contextlib.suppress(Exception):
            published.append(int(out.get(timeout=30)))
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)


# -- client -----------------------------------------------------------------------------


async def _drive(url: str, sc: RealScenario, seed: int, q: Any,
                 t0: float) -> list[tuple[float, float, int, str]]:
    """Open-loop arrivals; returns (t, latency ms, outcome 0 ok / 1 error, endpoint)."""
    import aiohttp

    arrivals = list(sc.load().arrivals(random.Random(seed * 104_729 + 2)))
    out: list[tuple[float, float, int, str]] = []
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=sc.deadline_s)

    async def one(session: aiohttp.ClientSession, t: float) -> None:
        start = time.monotonic()
        ep, bad, status, timed_out = "", 1, 0, False
        try:
            async with session.get(url) as r:
                await r.read()
                status = r.status
                ep = r.headers.get("X-Endpoint", "")
                bad = 0 if r.status == 200 else 1
        except TimeoutError:
            timed_out = True
        except aiohttp.ClientError:
            pass
        ms = (time.monotonic() - start) * 1000.0
        out.append((t, ms, bad, ep))
        if q is not None and ep:
            q.put((ep, ms, status or 504, timed_out, time.time()))

    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        tasks = []
        for t in arrivals:
            delay = t0 + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, t)))
        await asyncio.gather(*tasks)
    return out


def _warm_up(url: str, n: int) -> None:
    """A few sequential requests: connections open, every lane starts alike."""
    import urllib.request

    for _ in range(n):
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            r.read()


def phase_table(rows: list[tuple[float, float, int, str]],
                sc: RealScenario) -> dict[str, dict[str, float | None]]:
    t = np.array([r[0] for r in rows])
    ms = np.array([r[1] for r in rows])
    bad = np.array([r[2] for r in rows])
    out: dict[str, dict[str, float | None]] = {}
    for name, spans in sc.phases().items():
        m = np.zeros(t.size, dtype=bool)
        for a, b in spans:
            m |= (t >= a) & (t < b)
        out[name] = {"p99_ms": float(np.percentile(ms[m], 99)) if m.any() else None,
                     "errors_pct": 100.0 * float(bad[m].mean()) if m.any() else None,
                     "requests": int(m.sum())}
    return out


def run_real(sc: RealScenario, seeds: list[int], planes: tuple[str, ...],
             log: Any = print) -> dict[str, Any]:
    """Every (data plane, policy) once per seed; backends restarted per run (fresh
    queues). A phase's p99 and errors are over the requests of every seed pooled (each
    seed's too, in ``per_seed``)."""
    from streams.kafka.broker import EmbeddedBroker
    from streams.sidecar.haproxy import haproxy_binary

    res: dict[str, Any] = {}
    with EmbeddedBroker() as broker:
        for plane in planes:
            if plane == "haproxy" and haproxy_binary() is None:
                res[plane] = {"skipped": "haproxy is not installed (make system-deps)"}
                continue
            res[plane] = {}
            for policy in (PROXY_POLICIES if plane == "proxy" else HAPROXY_POLICIES):
                pooled: list[Any] = []
                per_seed: dict[int, Any] = {}
                published = 0
                for seed in seeds:
                    rows, scores = _one_real_run(broker, sc, seed, plane, policy)
                    pooled += rows
                    published += scores
                    per_seed[seed] = phase_table(rows, sc)
                res[plane][policy] = {"phases": phase_table(pooled, sc),
                                      "requests": len(pooled), "per_seed": per_seed,
                                      "scores_published": published}
                log(f"  real {plane} {policy} ({len(seeds)} seeds): " + ", ".join(
                    f"{k} p99 {v['p99_ms']:.0f} ms err {v['errors_pct']:.2f} %"
                    for k, v in res[plane][policy]["phases"].items()
                    if v["p99_ms"] is not None))
    return res


def _one_real_run(broker: Any, sc: RealScenario, seed: int, plane: str,
                  policy: str) -> tuple[list[Any], int]:
    """One seed's arrivals through ``plane`` with ``policy``: the client's rows and the
    number of scores the scorer published."""
    from streams.kafka.broker import free_port
    from streams.kafka.settings import KafkaSettings
    from streams.kafka.topics import ensure_topics
    from streams.sidecar.config import Upstream

    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap,
                          topic_prefix=f"real{uuid.uuid4().hex[:6]}.", partitions=1)
    ensure_topics(kafka)
    with backends(sc, time.time()) as urls:
        ups = [Upstream(id=b.id, url=urls[b.id], api=API,
                        capacity_rps=round(b.capacity_rps, 1)) for b in sc.specs()]
        port = free_port()
        with sidecar(kafka, ups, plane, policy, port), contextlib.ExitStack() as stack:
            q, pub = (stack.enter_context(scorer(kafka, sc))
                      if policy == "predictive" else (None, []))
            _warm_up(f"http://127.0.0.1:{port}/x", 20)
            for u in urls.values():  # the backends' clock starts now
                _warm_up(f"{u}/_t0", 1)
            t0 = time.monotonic()
            rows: list[Any] = asyncio.run(_drive(f"http://127.0.0.1:{port}/x", sc, seed,
                                                 q, t0))
    return rows, sum(pub)


def run_sim(sc: RealScenario, seeds: list[int]) -> dict[str, Any]:
    """The simulator on the same scenario (same backends, arrivals, spike, degradation),
    the same seeds pooled."""
    out: dict[str, Any] = {}
    for policy in SIM_POLICIES:
        pooled: list[Any] = []
        for seed in seeds:
            pooled += _one_sim_run(sc, seed, policy)
        out[policy] = {"phases": phase_table(pooled, sc), "requests": len(pooled)}
    return out


def _one_sim_run(sc: RealScenario, seed: int, policy: str) -> list[Any]:
    """One seed of the simulation with ``policy``: rows as the real client's."""
    load = sc.load()
    cfg = SimConfig(sc.specs(), load, [Slowdown(sc.degrade_backend, *sc.degrade,
                                                factor=sc.degrade_factor)],
                    deadline_s=sc.deadline_s, seed=seed, interval_s=sc.interval_s)
    control = None
    if policy == "predictive":
        control = PredictiveControl(PredictiveConfig(
            interval_s=sc.interval_s, step_s=2, horizon=5, lateness_s=sc.interval_s,
            season_s=600, capacities={b.id: b.capacity_rps for b in sc.specs()}),
            np.zeros(0))
    r = Simulation(cfg, policy, control).run()
    return [(float(t), float(ms), int(o != OK), "")
            for t, ms, o in zip(r.t_arrival, r.rtt_ms, r.outcome, strict=True)]


def order(res: dict[str, Any], phase: str) -> list[str]:
    """Policies best first by p99 in ``phase``."""
    got = {p: v["phases"][phase]["p99_ms"] for p, v in res.items()
           if isinstance(v, dict) and "phases" in v}
    return sorted((p for p in got if got[p] is not None), key=lambda p: got[p])


def same_with_ties(real: dict[str, Any], sim: dict[str, Any], ro: list[str], so: list[str],
                   phase: str) -> bool:
    """True when no pair of policies is ordered one way in the real run and the other way
    in the simulation by more than :data:`TIE` in both (a pair within ``TIE`` of each
    other on either side counts as tied)."""
    def p99(res: dict[str, Any], p: str) -> float:
        return float(res[p]["phases"][phase]["p99_ms"])

    for i, a in enumerate(ro):
        for b in ro[i + 1:]:
            if a not in so or b not in so or so.index(a) < so.index(b):
                continue  # same order, or not in both
            real_gap = p99(real, b) / max(p99(real, a), 1e-9) - 1.0
            sim_gap = p99(sim, a) / max(p99(sim, b), 1e-9) - 1.0
            if real_gap > TIE and sim_gap > TIE:
                return False
    return True


def compare(real: dict[str, Any], sim: dict[str, Any], sc: RealScenario) -> dict[str, Any]:
    """Per data plane and phase: the order of policies in the real run and in the
    simulation (restricted to the policies the plane ran), and whether they agree."""
    out: dict[str, Any] = {}
    for plane, pols in real.items():
        if "skipped" in pols:
            continue
        out[plane] = {}
        for phase in sc.phases():
            ro = order(pols, phase)
            so = [p for p in order(sim, phase) if p in pols]
            out[plane][phase] = {"real": ro, "sim": so, "same": ro == so,
                                 "same_with_ties": same_with_ties(pols, sim, ro, so, phase),
                                 "predictive_rank_real": ro.index("predictive") + 1
                                 if "predictive" in ro else None,
                                 "predictive_rank_sim": so.index("predictive") + 1
                                 if "predictive" in so else None}
    return out


def print_tables(console: Any, res: dict[str, Any]) -> None:
    from rich.table import Table

    sim = res["sim"]
    for plane, pols in res["real"].items():
        if "skipped" in pols:
            console.print(f"--real {plane}: {pols['skipped']}")
            continue
        t = Table(title=f"--real, {plane} data plane vs the simulation of the same run "
                        "(p99 ms / errors %)")
        t.add_column("policy")
        for ph in ("steady", "spike", "degraded"):
            t.add_column(f"{ph} real", justify="right")
            t.add_column(f"{ph} sim", justify="right")
        for pol, v in pols.items():
            row = [pol]
            for ph in ("steady", "spike", "degraded"):
                for src in (v, sim[pol]):
                    a = src["phases"][ph]
                    row.append("-" if a["p99_ms"] is None
                               else f"{a['p99_ms']:.0f} / {a['errors_pct']:.2f}")
            t.add_row(*row)
        console.print(t)
        for ph, c in res["order"][plane].items():
            console.print(f"  {plane} {ph}: real {' < '.join(c['real'])}; "
                          f"sim {' < '.join(c['sim'])}; same order: "
                          f"{'yes' if c['same'] else 'NO'}; same up to ties within "
                          f"{TIE:.0%}: {'yes' if c['same_with_ties'] else 'NO'}")


def main_real(console: Any, seed: int, planes: tuple[str, ...],
              n_seeds: int = 1) -> dict[str, Any]:
    sc = RealScenario()
    seeds = list(range(seed, seed + n_seeds))
    real = run_real(sc, seeds, planes, log=console.print)
    sim = run_sim(sc, seeds)
    res = {"scenario": {"slots": list(sc.slots), "median_ms": sc.median_s * 1000,
                        "capacity_rps": round(sc.capacity(), 1), "base_util": sc.base_util,
                        "spike": list(sc.spike), "spike_factor": sc.spike_factor,
                        "degrade": list(sc.degrade), "degrade_backend": sc.degrade_backend,
                        "degrade_factor": sc.degrade_factor, "seed": seed,
                        "seeds": seeds},
           "real": real, "sim": sim}
    res["order"] = compare(real, sim, sc)
    print_tables(console, res)
    return res

