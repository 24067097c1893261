"""``loadcast demo``: the whole pipeline on the embedded defaults, under real-shaped
traffic, ending in ``report.html`` and ``summary.json`` (composition only: the parts live
in ``streams``/``processors``/``sinks``; the scenario, simulated backends, load generator
and report in this package's modules).

This module runs the phases in order; each has its module: :mod:`~loadcast.demo.processes`
(child processes, waits, leftovers), :mod:`~loadcast.demo.lanes` (pipelines, lanes and
their processes), :mod:`~loadcast.demo.traffic` (history, client agents, the live run),
:mod:`~loadcast.demo.collect` (stop in order, drain, facts), :mod:`~loadcast.demo.report`
(queries, headline, charts, html).

What runs (every part a real process on 127.0.0.1, except the load generator and its
client-side edge agents, which run here):

- the embedded broker (Tansu), a forecasting worker, the ClickHouse sink on embedded chDB,
  the mirror planner, an executor for the edge region and the bundle server;
- ``loadcast api`` on the predictive lane's topics: its live control room (``/ui``, the
  address is printed at start) shows the scores, forecasts and mirrors while it runs;
- four *policy lanes* side by side on identical simulated backends (same capacities,
  same slow-down window): ``predictive`` (scores from the worker, edge mirrors),
  ``predictive-persistence`` (the ablation: the same pipeline on topics of its own, with
  a worker whose forecaster is persistence, its own planner, executor and mirrors),
  ``round-robin`` and ``peak-ewma`` (reactive, no Kafka). Each lane has a central and an
  edge sidecar (``loadcast sidecar``), and gets the same seeded arrivals at the same
  instants;
- first a few compressed days of history (telemetry only, flat out) so the seasonal
  forecaster knows the daily shape, then the live run.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from loadcast.demo import collect, lanes, traffic
from loadcast.demo import scenario as scn
from loadcast.demo.processes import Children, http_json, kill_leftovers, wait_for
from loadcast.demo.report import build_report
from loadcast.settings import Settings
from streams.edge.replay import read_trace
from streams.edge.replay import trace_path as find_trace
from streams.executor.supervise import kill_recorded
from streams.kafka.broker import EmbeddedBroker, free_port
from streams.kafka.settings import KafkaSettings

DEFAULT_TRACE = "elb_request_count_8c0756.csv"


class ScoreWatch:
    """Latest LoadScore per endpoint, read from the load-scores topic (worker readiness,
    history progress, the live view)."""

    def __init__(self, kafka: KafkaSettings) -> None:
        from schemas.codec import Codec
        from streams.kafka.runtime import KafkaRuntime

        runtime = KafkaRuntime(kafka)
        self.codec = Codec.embedded()
        self.consumer = runtime.consumer(None, topics=[runtime.topic("load-scores")])
        self.latest: dict[str, dict[str, Any]] = {}
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="demo-scores")
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for msg in self.consumer.consume(500, 0.2):
                    if msg.error() or msg.value() is None:
                        continue
                    try:
                        rec = self.codec.decode(msg.value() or b"", "LoadScore")
                    except ValueError:
                        continue
                    self.count += 1
                    self.latest[rec["endpoint_id"]] = rec
        finally:
            self.consumer.close()

    def forecast_reaches(self, endpoint: str, at_ms: int) -> bool:
        s = self.latest.get(endpoint)
        return bool(s and s["forecast"] and s["forecast"][0]["at"] >= at_ms)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)



def run_demo(settings: Settings, *, out_dir: Path, quick: bool = False,
             live_seconds: int | None = None, trace_path: Path | None = None) -> dict[str, Any]:
    """Run the demo; write ``out_dir/report.html`` and ``out_dir/summary.json``; return
    the summary. Raises :class:`~loadcast.demo.processes.DemoError` when a part fails,
    ``KeyboardInterrupt`` on Ctrl-C/SIGTERM (after stopping everything and checking that
    nothing is left)."""
    path = find_trace(trace_path or DEFAULT_TRACE)
    if not path.is_file():
        raise FileNotFoundError(f"trace {path} not found (set LOADCAST_DATA_DIR or --trace)")
    sc = scn.Scenario.quick() if quick else scn.Scenario()
    if live_seconds is not None:
        sc = scn.Scenario(**{**sc.__dict__, "live_seconds": live_seconds})
    shapes = scn.day_shapes(read_trace(path), sc.season_s)
    out_dir = out_dir.resolve()
    work = out_dir / "work"
    for old in (work, out_dir / "clickhouse", out_dir / "report.html", out_dir / "summary.json"):
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    work.mkdir(parents=True)
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    console = Console()
    try:
        facts = _run(settings, sc, shapes, path, out_dir, work, stop, console)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    if stop.is_set() and facts is None:
        raise KeyboardInterrupt
    assert facts is not None
    # What the report is drawn from, to draw it again: build_report(facts, out_dir).
    (work / "facts.json").write_text(json.dumps(facts, default=str))
    console.print("querying ClickHouse and drawing the report ...")
    summary = build_report(facts, out_dir)
    console.print(f"[bold]report[/bold] {out_dir / 'report.html'}")
    console.print(f"[bold]summary[/bold] {out_dir / 'summary.json'}")
    for r in facts.get("restarts", []):
        console.print(f"[yellow]{r['part']} died (exit {r['exit_code']}) and was started "
                      f"again: see {r['log']}[/yellow]")
    return summary


@dataclass
class _Parts:
    """Everything the run started, to stop it whatever happens."""

    work: Path
    out_dir: Path
    broker: EmbeddedBroker = field(default_factory=EmbeddedBroker)
    children: Children | None = None
    watches: list[ScoreWatch] = field(default_factory=list)
    clients: traffic.ClientAgents = field(default_factory=traffic.ClientAgents)
    ports: list[int] = field(default_factory=list)

    @property
    def exec_dirs(self) -> dict[str, Path]:
        return {"predictive": self.work / "executor",
                "predictive-persistence": self.work / "executor-pp"}

    def stop(self, console: Console) -> int:
        """Stop everything in reverse order; the number of leftover processes killed."""
        self.clients.close()
        for w in self.watches:
            w.close()
        if self.children is not None:
            self.children.stop_all()
        for d in self.exec_dirs.values():
            kill_recorded(d) if (d / "state.json").exists() else None
        self.broker.stop()
        return kill_leftovers(self.out_dir, self.ports, console)


def _run(settings: Settings, sc: scn.Scenario, shapes: list[list[float]], trace: Path,
         out_dir: Path, work: Path, stop: threading.Event,
         console: Console) -> dict[str, Any] | None:
    started = time.time()
    parts = _Parts(work, out_dir)
    facts: dict[str, Any] | None = None
    chdb = out_dir / "clickhouse"
    try:
        parts.broker.start()
        pipes = lanes.make_pipes(settings.kafka, parts.broker.bootstrap)
        console.print(f"embedded broker at {parts.broker.bootstrap}")
        children = parts.children = Children(work, lanes.child_env(settings.kafka))
        topo = lanes.topology(sc)
        parts.ports = topo.ports
        lane_env = lanes.start_pipelines(children, pipes, topo, sc, work, chdb,
                                         parts.exec_dirs)
        console.print(f"[bold]live control room[/bold]: {_start_api(parts)}/ui")
        parts.watches = [ScoreWatch(p.kafka) for p in pipes.values()]
        t0 = _warm_up(children, pipes, topo, sc, shapes, parts.watches, stop, console)
        lanes.start_planners(children, pipes, lane_env)
        for (policy, region), (_, admin) in topo.sidecar_ports.items():
            wait_for(lambda a=admin: http_json(f"http://127.0.0.1:{a}/health"), 60,
                     f"sidecar {policy}-{region}", children, stop)
        run = traffic.run_live(children, pipes, topo, sc, shapes, t0, parts.clients, work,
                               stop, console)
        if stop.is_set():
            console.print("interrupted: stopping everything")
            return None
        collect.drain(children, parts.clients, chdb, stop, console)
        facts = collect.facts(sc, trace, chdb, started, t0, topo, run, {
            lane: w.count for lane, w in zip(pipes, parts.watches, strict=True)})
        facts["restarts"] = children.restarted
        return facts
    finally:
        left = parts.stop(console)
        if facts is not None:
            facts["leftover_processes"] = left


def _start_api(parts: _Parts) -> str:
    """``loadcast api`` on the predictive pipeline, on a free port; its address. Not
    waited for: it comes up while the workers warm up (a child that dies stops the demo)."""
    assert parts.children is not None
    port = free_port()
    parts.ports.append(port)
    # the page only: no KEDA scaler (its port would be another one to find free)
    parts.children.start("api", ["api", "--port", str(port), "--no-keda"], nice=10)
    return f"http://127.0.0.1:{port}"


def _warm_up(children: Children, pipes: dict[str, lanes.Pipe], topo: lanes.Topology,
             sc: scn.Scenario, shapes: list[list[float]], watches: list[ScoreWatch],
             stop: threading.Event, console: Console) -> float:
    """Wait for the workers' first scores, replay the compressed days of history on each
    pipeline and wait until they are scored; the history's start (epoch seconds)."""
    traffic.probe(pipes)
    console.print("waiting for the forecasting workers ...")
    wait_for(lambda: all("demo-probe" in w.latest for w in watches), 150,
             "the workers' first scores", children, stop)
    t0 = float(int(time.time()) - sc.history_seasons * sc.season_s)
    console.print(f"replaying {sc.history_seasons} compressed days of history ...")
    hist_s = sc.history_seasons * sc.season_s
    for lane, p in pipes.items():
        traffic.history(p.kafka, sc, shapes, topo.lanes[lane], t0, range(hist_s))
    hist_end_ms = int((t0 + sc.history_seasons * sc.season_s - 2) * 1000)
    wait_for(lambda: all(w.forecast_reaches(s.id, hist_end_ms)
                         for w, lane in zip(watches, pipes, strict=True)
                         for s in topo.lanes[lane]),
             90, "the history to be scored", children, stop)
    return t0
