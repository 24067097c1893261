"""The demo's traffic: the compressed days of history (telemetry only, flat out), the
client-side edge agents, and the live run of the load generator with its live view."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from loadcast.demo import scenario as scn
from loadcast.demo.lanes import Pipe, Topology
from loadcast.demo.loadgen import LoadGenerator, client_endpoint
from loadcast.demo.processes import Children, http_json
from processors.mirroring import demand_series_id
from schemas.codec import Codec
from streams.edge.agent import EdgeAgent, build_agent, zero_host_stats
from streams.kafka.settings import KafkaSettings

# Seconds from fixing the live start to it: the backends (4.3 s to start at load 7), the
# history top-up (2.2 s), the client agents and a full collection. With 10 s, a run at
# load 7.7 began 1.5 s late, its first arrivals sent in a burst.
LIVE_SLACK_S = 14.0


def history(kafka: KafkaSettings, sc: scn.Scenario, shapes: list[list[float]],
             specs: list[scn.BackendSpec], t0: float, seconds: range) -> None:
    """Replay ``seconds`` (after ``t0``) of the compressed days as a predictive lane's
    telemetry (demand split by capacity, as the weights would), flat out, in event time;
    the edge region's demand also on its demand series, as the edge sidecar counts it."""
    codec = Codec.embedded()
    agents = {r: build_agent(kafka, codec, agent_id=f"history-{r}", region=r,
                             interval_seconds=1.0, host_stats=zero_host_stats, batch=True)
              for r in (scn.CENTRAL, scn.EDGE)}
    by_region = {r: [s for s in specs if s.region == r] for r in agents}
    try:
        for sec in seconds:
            c, e = scn.rates_at(sc, shapes, sec)
            if round(e):
                agents[scn.EDGE].record(demand_series_id(scn.API, scn.EDGE), 0.0, 200,
                                        api=scn.API, at=t0 + sec + 0.5, count=round(e))
            for region, rate in ((scn.CENTRAL, c), (scn.EDGE, e)):
                eps = by_region[region]
                cap = sum(s.capacity_rps for s in eps)
                for s in eps:
                    n = round(rate * s.capacity_rps / cap)
                    if n:
                        agents[region].record(s.id, sc.service_ms, 200, api=scn.API,
                                              at=t0 + sec + 0.5, count=n)
            for a in agents.values():
                a.tick(t0 + sec + 1)
    finally:
        for a in agents.values():
            a.close(30)


def probe(pipes: dict[str, Pipe]) -> None:
    """One record on each pipeline: its worker's first score says it is up."""
    codec = Codec.embedded()
    for p in pipes.values():
        a = build_agent(p.kafka, codec, agent_id="demo-probe", region=scn.CENTRAL,
                        interval_seconds=1.0, host_stats=zero_host_stats)
        a.record("demo-probe", 5.0, 200, api="probe", at=time.time() - 3)
        a.close()


class ClientAgents:
    """The load generator's edge agents, one per client region: each lane's client-side
    latency and errors, published as telemetry of the API ``scn.CLIENT_API``."""

    def __init__(self) -> None:
        self.agents: dict[str, EdgeAgent] = {}
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, kafka: KafkaSettings) -> None:
        codec = Codec.embedded()
        for region in (scn.CENTRAL, scn.EDGE):
            self.agents[region] = build_agent(
                kafka, codec, agent_id=f"demo-clients-{region}", region=region,
                interval_seconds=1.0, host_stats=zero_host_stats, batch=True)
            th = threading.Thread(target=self.agents[region].run, args=(self.stop,),
                                  daemon=True, name=f"clients-{region}")
            th.start()
            self.threads.append(th)

    def record(self, policy: str, region: str, _: str, ms: float, status: int,
               connect_failure: bool, timed_out: bool) -> None:
        self.agents[region].record(client_endpoint(policy, region), ms, status,
                                   api=scn.CLIENT_API, connect_failure=connect_failure,
                                   timed_out=timed_out)

    def close(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(30)
        self.agents.clear()


@dataclass
class LiveRun:
    """What the live run did, for the facts."""

    t_live: float
    t_end: float
    live: dict[str, list[scn.BackendSpec]]
    gen: LoadGenerator
    arrivals: int
    load_before: float
    start_steps: dict[str, float]  # seconds each step before the live start took, and spare


def _step(steps: dict[str, float], name: str, since: float) -> float:
    now = time.time()
    steps[name] = round(now - since, 2)
    return now


def run_live(children: Children, pipes: dict[str, Pipe], topo: Topology, sc: scn.Scenario,
             shapes: list[list[float]], t0: float, clients: ClientAgents, work: Path,
             stop: threading.Event, console: Console) -> LiveRun:
    """Start the backends (slow-down window set), fill the history up to the live start,
    start the client agents, and send the arrivals to every lane with a live view."""
    # The seconds between the history's end and the live start are replayed too, so
    # the forecasters see no gap (a gap looks like a season without traffic): most of them
    # now, the last few once the live start is fixed (LIVE_SLACK_S ahead, then moved out
    # of the edge spikes: up to 18 s more, replayed ahead too, within the 60 s clock-skew
    # allowance). How long each step took is kept for the report.
    hist_s = sc.history_seasons * sc.season_s
    bulk_end = int(time.time() - t0) + 1
    for lane, p in pipes.items():
        history(p.kafka, sc, shapes, topo.lanes[lane], t0, range(hist_s, bulk_end))
    steps: dict[str, float] = {}
    t = time.time()
    t_live = sc.live_start(t0, t + LIVE_SLACK_S)
    live = scn.backends(sc, t0, t_live)
    specs = [{**s.__dict__, "port": topo.backend_port[s.id]} for lane in live.values()
             for s in lane]
    (work / "backends.json").write_text(json.dumps(specs))
    be = children.start("backends", [str(work / "backends.json")], stdout_pipe=True,
                        module="loadcast.demo.backends")
    children.line(be, 30)
    t = _step(steps, "backends_s", t)
    for lane, p in pipes.items():
        history(p.kafka, sc, shapes, topo.lanes[lane], t0,
                range(max(hist_s, bulk_end), int(t_live - t0)))
    t = _step(steps, "history_top_up_s", t)
    clients.start(pipes["predictive"].kafka)
    arrivals = scn.schedule(sc, shapes, t_live - t0)
    targets = {p: {r: f"http://127.0.0.1:{topo.sidecar_ports[(p, r)][0]}"
                   for r in (scn.CENTRAL, scn.EDGE)} for p in scn.POLICIES}
    gen = LoadGenerator(targets, arrivals, clients.record, start_epoch=t_live)
    t = _step(steps, "client_agents_s", t)
    # Everything built so far (trace, schedule, history) lives to the end: kept out of
    # the collector's sight, or each full collection stops the load generator for
    # 0.6-0.7 s (measured) and the arrivals behind it go out late, in a burst. Before the
    # live start: this collection itself takes up to 0.9 s.
    gc.collect()
    gc.freeze()
    _step(steps, "gc_s", t)
    steps["spare_s"] = round(t_live - time.time(), 2)  # < 0: the live start was late
    time.sleep(max(0.0, t_live - time.time()))
    spare = steps["spare_s"]
    console.print(f"live: {sc.live_seconds}s, {len(arrivals)} arrivals x "
                  f"{len(scn.POLICIES)} lanes"
                  + ("" if spare >= 0 else f" (the set-up overran the live start by "
                                           f"{-spare:.1f} s: the first arrivals go late)"))
    load_before = os.getloadavg()[0]
    _show_live(LiveView(sc, gen, topo.sidecar_ports, t0, t_live), gen, stop, console)
    children.check()
    return LiveRun(t_live, time.time(), live, gen, len(arrivals), load_before, steps)


def _show_live(view: LiveView, gen: LoadGenerator, stop: threading.Event,
               console: Console) -> None:
    """Run the load generator until done (or stopped), refreshing the live view."""
    with Live(view.render(), console=console, refresh_per_second=2) as lv:
        done = threading.Event()

        def refresh() -> None:
            while not done.wait(0.5):
                view.poll()
                lv.update(view.render())

        ref = threading.Thread(target=refresh, daemon=True)
        ref.start()
        try:
            asyncio.run(gen.run(stop.is_set))
        finally:
            done.set()
            ref.join(5)
        lv.update(view.render())


class LiveView:
    """What is happening now: per lane rates, p99 and errors (client side), the
    predictive lane's weights and edge mirrors (from its sidecars' admin endpoints)."""

    def __init__(self, sc: scn.Scenario, gen: LoadGenerator,
                 sport: dict[tuple[str, str], tuple[int, int]], t0: float,
                 t_live: float) -> None:
        self.sc, self.gen, self.sport, self.t0, self.t_live = sc, gen, sport, t0, t_live
        self.weights: dict[str, float] = {}
        self.policy = ""
        self.mirrors: list[str] = []
        self.last_poll = 0.0

    def poll(self) -> None:
        if time.monotonic() - self.last_poll < 1.0:
            return
        self.last_poll = time.monotonic()
        try:
            w = http_json(f"http://127.0.0.1:{self.sport[('predictive', 'central')][1]}"
                           "/weights")[scn.API]
            self.weights = {e: v["weight"] for e, v in w["endpoints"].items()}
            self.policy = w.get("policy", "")
            h = http_json(f"http://127.0.0.1:{self.sport[('predictive', 'edge')][1]}/health")
            self.mirrors = [f"{k}: demand {v.get('predicted_demand_rps', 0):.0f}/"
                            f"{v.get('central_capacity_rps', 0):.0f} rps, "
                            f"{len(v.get('mirrors') or {})} ready, {v.get('routed', 0)} routed"
                            for k, v in (h.get("mirrors") or {}).items() if k.startswith(scn.API)]
        except (OSError, ValueError, KeyError):
            pass

    def render(self) -> Group:
        now = time.monotonic()
        el = time.time() - self.t_live
        phase = scn.phase_of(self.sc, self.t0, self.t_live, time.time())
        t = Table(title=f"loadcast demo - live {max(0.0, el):4.0f}s of {self.sc.live_seconds}s"
                        f" - phase: {phase}",
                  caption="rps over 3 s, p99 and error share over 5 s, client side")
        for col in ("lane", "sent", "rps", "p99 ms", "errors", "failed", "in flight"):
            t.add_column(col, justify="right" if col != "lane" else "left")
        for p, s in self.gen.stats.items():
            p99 = s.p99(now)
            t.add_row(p, f"{s.sent:,}", f"{s.rate(now):.0f}",
                      "-" if p99 is None else f"{p99:.0f}", f"{s.error_share(now):.1%}",
                      f"{s.errors + s.dropped:,}", str(s.in_flight))
        w = ", ".join(f"{e}={v:.2f}" for e, v in sorted(self.weights.items())) or "-"
        m = "; ".join(self.mirrors) if self.mirrors else "none active"
        extra = Table.grid(padding=(0, 1))
        extra.add_row("predictive central weights", f"{w} ({self.policy or '?'})")
        extra.add_row("edge mirrors", m)
        return Group(t, extra)
