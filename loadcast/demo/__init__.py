"""``loadcast demo``: the whole pipeline on the embedded defaults, under real-shaped
traffic, ending in ``report.html`` and ``summary.json`` (composition only: the parts live
in ``streams``/``processors``/``sinks``; the scenario, simulated backends, load generator
and report in this package's modules).

What runs (every part a real process on 127.0.0.1, except the load generator and its
client-side edge agents, which run here):

- the embedded broker (Tansu), a forecasting worker, the ClickHouse sink on embedded chDB,
  the mirror planner, an executor for the edge region and the bundle server;
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

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from loadcast.demo import scenario as scn
from loadcast.demo.loadgen import LoadGenerator, client_endpoint
from loadcast.settings import Settings
from streams.replay import read_trace
from streams.settings import KafkaSettings

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRACE = "elb_request_count_8c0756.csv"
MIRROR_BUNDLE = Path(__file__).parent / "mirror_api"


class DemoError(RuntimeError):
    """A part of the demo did not start or died; the message says which and where its
    log is."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[str]
    log: Path


class Children:
    """The demo's child processes: started in sessions of their own (Ctrl-C reaches only
    the demo, which stops them in order), stopped in reverse order, SIGKILL as last resort."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env = work, env
        self.all: list[Child] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              stdout_pipe: bool = False, module: str = "loadcast") -> Child:
        log = self.work / f"{name}.log"
        f = log.open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=self.work,
            env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else f, stderr=f, text=True,
            start_new_session=True)
        f.close()
        c = Child(name, proc, log)
        self.all.append(c)
        return c

    def line(self, c: Child, timeout: float) -> str:
        """The next stdout line of ``c`` (DemoError when it does not come)."""
        out: list[str] = []
        assert c.proc.stdout is not None
        stream = c.proc.stdout
        t = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not out or not out[0].strip():
            raise DemoError(f"{c.name} did not start: see {c.log}")
        return out[0].strip()

    def check(self) -> None:
        for c in self.all:
            if c.proc.poll() is not None:
                raise DemoError(f"{c.name} exited with {c.proc.returncode}: see {c.log}")

    def stop(self, c: Child, timeout: float = 20.0) -> None:
        if c.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait(5)
        if c.proc.stdout is not None:
            c.proc.stdout.close()

    def stop_all(self) -> None:
        for c in reversed(self.all):
            self.stop(c)


def _http_json(url: str, timeout: float = 1.0, token: str = "") -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # loopback only
        return json.loads(r.read())


def _wait(cond: Any, timeout: float, what: str, children: Children,
          stop: threading.Event) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop.is_set():
            raise KeyboardInterrupt
        try:
            v = cond()
        except OSError:
            v = None
        if v:
            return v
        children.check()
        time.sleep(0.3)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")


class ScoreWatch:
    """Latest LoadScore per endpoint, read from the load-scores topic (worker readiness,
    history progress, the live view)."""

    def __init__(self, kafka: KafkaSettings) -> None:
        from confluent_kafka import Consumer

        from schemas.codec import Codec
        from streams.topics import topic_name

        self.codec = Codec.embedded()
        self.consumer = Consumer(kafka.consumer_config(None))
        self.consumer.subscribe([topic_name(kafka, "load-scores")])
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


def _sidecar_env(policy: str, region: str, upstreams: list[dict[str, Any]],
                 edge_capacity: float) -> dict[str, str]:
    predictive = policy in scn.PREDICTIVE
    env = {
        "LOADCAST_SIDECAR__SIDECAR_ID": f"{policy}-{region}",
        "LOADCAST_SIDECAR__REGION": region,
        "LOADCAST_SIDECAR__UPSTREAMS": json.dumps(upstreams),
        # The ablation lane routes like the predictive one; only its forecasts differ.
        "LOADCAST_SIDECAR__POLICY": "predictive" if predictive else policy,
        "LOADCAST_SIDECAR__FALLBACK_POLICY": "peak-ewma" if predictive else policy,
        "LOADCAST_SIDECAR__TELEMETRY_INTERVAL_S": "1",
        "LOADCAST_SIDECAR__REQUEST_TIMEOUT_S": "2.5",
        "LOADCAST_SIDECAR__DECISION_SAMPLE_RATE": "0.02",
        "LOADCAST_SIDECAR__SCORE_LOOKBACK_S": "5",
        "LOADCAST_SIDECAR__MIRROR_LOOKAHEAD_S": "5",
        "LOADCAST_SIDECAR__CENTRAL_CAPACITY_RPS": json.dumps({scn.API: edge_capacity}),
    }
    return env


def _history(kafka: KafkaSettings, sc: scn.Scenario, shapes: list[list[float]],
             specs: list[scn.BackendSpec], t0: float, seconds: range) -> None:
    """Replay ``seconds`` (after ``t0``) of the compressed days as a predictive lane's
    telemetry (demand split by capacity, as the weights would), flat out, in event time."""
    from schemas.codec import Codec
    from streams.agent import build_agent, zero_host_stats

    codec = Codec.embedded()
    agents = {r: build_agent(kafka, codec, agent_id=f"history-{r}", region=r,
                             interval_seconds=1.0, host_stats=zero_host_stats, batch=True)
              for r in (scn.CENTRAL, scn.EDGE)}
    by_region = {r: [s for s in specs if s.region == r] for r in agents}
    try:
        for sec in seconds:
            c, e = scn.rates_at(sc, shapes, sec)
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


def run_demo(settings: Settings, *, out_dir: Path, quick: bool = False,
             live_seconds: int | None = None, trace_path: Path | None = None) -> dict[str, Any]:
    """Run the demo; write ``out_dir/report.html`` and ``out_dir/summary.json``; return
    the summary. Raises :class:`DemoError` when a part fails, ``KeyboardInterrupt`` on
    Ctrl-C/SIGTERM (after stopping everything and checking that nothing is left)."""
    from streams.replay import trace_path as find_trace

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
    from loadcast.demo.report import build_report

    # What the report is drawn from, to draw it again: build_report(facts, out_dir).
    (work / "facts.json").write_text(json.dumps(facts, default=str))
    console.print("querying ClickHouse and drawing the report ...")
    summary = build_report(facts, out_dir)
    console.print(f"[bold]report[/bold] {out_dir / 'report.html'}")
    console.print(f"[bold]summary[/bold] {out_dir / 'summary.json'}")
    return summary


def _leftovers(out_dir: Path, ports: list[int]) -> list[str]:
    """Processes that still name the demo's directory or hold one of its ports."""
    import psutil

    me = os.getpid()
    mine = {me, *(p.pid for p in psutil.Process(me).parents())}  # e.g. `timeout`, make
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            if p.pid in mine or p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info.get("cmdline") or [])
            cwd = p.info.get("cwd") or ""
            if str(out_dir) in cmd or cwd.startswith(str(out_dir)):
                left.append(f"{p.pid} {cmd[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    with contextlib.suppress(psutil.AccessDenied):
        for c in psutil.net_connections("tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in ports and c.pid \
                    and c.pid not in mine:
                left.append(f"{c.pid} listening on {c.laddr.port}")
    return left


def _run(settings: Settings, sc: scn.Scenario, shapes: list[list[float]], trace: Path,
         out_dir: Path, work: Path, stop: threading.Event,
         console: Console) -> dict[str, Any] | None:
    from processors.signing import generate_keypair
    from schemas.codec import Codec
    from streams.agent import build_agent, zero_host_stats
    from streams.broker import EmbeddedBroker, free_port
    from streams.bundles import DirectoryStore, push
    from streams.executor.supervise import kill_recorded
    from streams.topics import ensure_topics

    started = time.time()
    broker = EmbeddedBroker()
    children: Children | None = None
    watches: list[ScoreWatch] = []
    client_agents: dict[str, Any] = {}
    agent_stop = threading.Event()
    agent_threads: list[threading.Thread] = []
    ports: list[int] = []
    facts: dict[str, Any] | None = None
    gen: LoadGenerator | None = None
    exec_dirs = {"predictive": work / "executor", "predictive-persistence": work / "executor-pp"}
    chdb = out_dir / "clickhouse"
    try:
        broker.start()
        k = settings.kafka
        k.bootstrap_servers = broker.bootstrap
        k.partitions = 4
        ensure_topics(k)
        # The ablation lane's pipeline: the same processes on topics of their own.
        kpp = k.model_copy(update={"topic_prefix": f"{k.topic_prefix}pp.", "partitions": 1})
        ensure_topics(kpp)
        pipes = {"predictive": (k, {}, ""),
                 "predictive-persistence": (kpp, {
                     "LOADCAST_KAFKA__TOPIC_PREFIX": kpp.topic_prefix,
                     "LOADCAST_KAFKA__PARTITIONS": "1"}, "-pp")}
        console.print(f"embedded broker at {broker.bootstrap}")
        env = {**os.environ,
               "LOADCAST_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
               "LOADCAST_KAFKA__TOPIC_PREFIX": k.topic_prefix,
               "LOADCAST_KAFKA__PARTITIONS": str(k.partitions),
               "PYTHONUNBUFFERED": "1"}
        children = Children(work, env)
        t_wall = {"t0": 0.0, "t_live": 0.0}

        # ---------------------------------------------------------------- topology
        lanes = scn.backends(sc, 0.0, 0.0)  # ports and capacities now; slow-down when live
        bport = {s.id: free_port() for specs in lanes.values() for s in specs}
        sport = {(p, r): (free_port(), free_port()) for p in scn.POLICIES
                 for r in (scn.CENTRAL, scn.EDGE)}
        ports = [*bport.values(), *(x for pr in sport.values() for x in pr)]
        edge_cap = sum(s.capacity_rps for s in lanes["predictive"] if s.region == scn.EDGE)
        capacities = {s.id: s.capacity_rps for s in lanes["predictive"]}

        # ---------------------------------------------------------------- pipeline
        private, public = generate_keypair()
        digest, _ = push(MIRROR_BUNDLE, DirectoryStore(work / "store"))
        for lane, (_, kenv, sfx) in pipes.items():
            children.start(f"worker{sfx}", ["worker"], {
                **kenv,
                "LOADCAST_PROCESSOR__APP_ID": f"demo-worker{sfx}",
                "LOADCAST_PROCESSOR__FORECASTER": "persistence" if sfx else "default",
                "LOADCAST_PROCESSOR__STEP_SECONDS": "1",
                "LOADCAST_PROCESSOR__SEASON_SECONDS": str(sc.season_s),
                "LOADCAST_PROCESSOR__LATENESS_SECONDS": "0",
                "LOADCAST_PROCESSOR__HORIZON": "15",
                "LOADCAST_PROCESSOR__SNAPSHOT_EVERY_SECONDS": "5",
                "LOADCAST_PROCESSOR__CAPACITY_RPS": json.dumps(
                    {s.id: s.capacity_rps for s in lanes[lane]}),
            })
        children.start("sink", ["sink", "--admin-port", "0"], {
            "LOADCAST_SINK__DSN": f"chdb://{chdb}", "LOADCAST_SINK__GROUP_ID": "demo-sink",
            "LOADCAST_SINK__BATCH_MAX_SECONDS": "1"})
        store = children.start("bundles", ["bundle", "serve", "--store", str(work / "store"),
                                           "--port", "0"], stdout_pipe=True)
        store_url = children.line(store, 60)
        mirror_env = {
            "LOADCAST_MIRROR__SIGNING_KEY": private, "LOADCAST_MIRROR__KEY_ID": "demo",
            "LOADCAST_MIRROR__TRUSTED_KEYS": json.dumps({"demo": public}),
            "LOADCAST_MIRROR__EXECUTOR_ID": "executor-edge",
            "LOADCAST_MIRROR__DRAIN_SECONDS": "1",
            "LOADCAST_MIRROR__PLANNER_APP_ID": "demo-planner",
            "LOADCAST_MIRROR__BUNDLES": json.dumps(
                {scn.API: {"digest": digest, "instance_capacity_rps": 40}}),
            "LOADCAST_MIRROR__CENTRAL_CAPACITY_RPS": json.dumps({scn.API: edge_cap}),
            "LOADCAST_MIRROR__ACTIVATION_SECONDS": "2", "LOADCAST_MIRROR__MARGIN_SECONDS": "2",
            "LOADCAST_MIRROR__COOLDOWN_SECONDS": "8", "LOADCAST_MIRROR__TICK_SECONDS": "0.5",
        }
        lane_env = {lane: {**mirror_env, **kenv,
                           "LOADCAST_MIRROR__EXECUTOR_ID": f"executor-edge{sfx}",
                           "LOADCAST_MIRROR__PLANNER_APP_ID": f"demo-planner{sfx}"}
                    for lane, (_, kenv, sfx) in pipes.items()}
        for lane, (_, _, sfx) in pipes.items():
            executor = children.start(f"executor{sfx}", [
                "--log-level", "INFO", "executor", "--region", scn.EDGE, "--work-dir",
                str(exec_dirs[lane]), "--store-url", store_url, "--stop-instances-on-exit"],
                lane_env[lane], stdout_pipe=True)
            if children.line(executor, 90) != "ready":
                raise DemoError(f"executor did not start: see {executor.log}")
        for (policy, region), (port, admin) in sport.items():
            ups = [{"id": s.id, "url": f"http://127.0.0.1:{bport[s.id]}", "api": scn.API,
                    "region": region, "capacity_rps": s.capacity_rps}
                   for s in lanes[policy] if s.region == region]
            args = ["sidecar", "--port", str(port), "--admin-port", str(admin)]
            if policy not in scn.PREDICTIVE:
                args.append("--no-kafka")  # a reactive baseline: no scores, no mirrors
            children.start(f"sidecar-{policy}-{region}", args,
                           {**_sidecar_env(policy, region, ups, edge_cap),
                            **(pipes[policy][1] if policy in pipes else {})})

        # ---------------------------------------------------------------- warm-up
        watches = [ScoreWatch(kk) for kk, _, _ in pipes.values()]
        watch = watches[0]
        codec = Codec.embedded()
        for kk, _, _ in pipes.values():
            probe = build_agent(kk, codec, agent_id="demo-probe", region=scn.CENTRAL,
                                interval_seconds=1.0, host_stats=zero_host_stats)
            probe.record("demo-probe", 5.0, 200, api="probe", at=time.time() - 3)
            probe.close()
        console.print("waiting for the forecasting workers ...")
        _wait(lambda: all("demo-probe" in w.latest for w in watches), 150,
              "the workers' first scores", children, stop)
        t0 = float(int(time.time()) - sc.history_seasons * sc.season_s)
        t_wall["t0"] = t0
        console.print(f"replaying {sc.history_seasons} compressed days of history ...")
        hist_s = sc.history_seasons * sc.season_s
        for lane, (kk, _, _) in pipes.items():
            _history(kk, sc, shapes, lanes[lane], t0, range(hist_s))
        hist_end_ms = int((t0 + sc.history_seasons * sc.season_s - 2) * 1000)
        _wait(lambda: all(w.forecast_reaches(s.id, hist_end_ms)
                          for w, lane in zip(watches, pipes, strict=True)
                          for s in lanes[lane]),
              90, "the history to be scored", children, stop)
        for lane, (_, _, sfx) in pipes.items():
            children.start(f"planner{sfx}", ["--log-level", "INFO", "planner"],
                           lane_env[lane])
        for (policy, region), (_, admin) in sport.items():
            _wait(lambda a=admin: _http_json(f"http://127.0.0.1:{a}/health"), 60,
                  f"sidecar {policy}-{region}", children, stop)

        # ---------------------------------------------------------------- live
        # The seconds between the history's end and the live start are replayed too, so
        # the forecasters see no gap (a gap looks like a season without traffic).
        t_live = float(int(time.time()) + 5)
        t_wall["t_live"] = t_live
        live = scn.backends(sc, t0, t_live)
        specs = [{**s.__dict__, "port": bport[s.id]} for lane in live.values() for s in lane]
        (work / "backends.json").write_text(json.dumps(specs))
        be = children.start("backends", [str(work / "backends.json")], stdout_pipe=True,
                            module="loadcast.demo.backends")
        children.line(be, 30)
        for lane, (kk, _, _) in pipes.items():
            _history(kk, sc, shapes, lanes[lane], t0, range(hist_s, int(t_live - t0)))
        for region in (scn.CENTRAL, scn.EDGE):
            client_agents[region] = build_agent(
                k, codec, agent_id=f"demo-clients-{region}", region=region,
                interval_seconds=1.0, host_stats=zero_host_stats, batch=True)
            th = threading.Thread(target=client_agents[region].run, args=(agent_stop,),
                                  daemon=True, name=f"clients-{region}")
            th.start()
            agent_threads.append(th)

        def record(policy: str, region: str, _: str, ms: float, status: int,
                   connect_failure: bool, timed_out: bool) -> None:
            client_agents[region].record(client_endpoint(policy, region), ms, status,
                                         api=scn.CLIENT_API, connect_failure=connect_failure,
                                         timed_out=timed_out)

        arrivals = scn.schedule(sc, shapes, t_live - t0)
        targets = {p: {r: f"http://127.0.0.1:{sport[(p, r)][0]}"
                       for r in (scn.CENTRAL, scn.EDGE)} for p in scn.POLICIES}
        gen = LoadGenerator(targets, arrivals, record, start_epoch=t_live)
        time.sleep(max(0.0, t_live - time.time()))
        console.print(f"live: {sc.live_seconds}s, {len(arrivals)} arrivals x "
                      f"{len(scn.POLICIES)} lanes")
        view = _LiveView(sc, gen, sport, t0, t_live)
        load_before = os.getloadavg()[0]
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
        children.check()
        t_end = time.time()
        if stop.is_set():
            console.print("interrupted: stopping everything")
            return None

        # ---------------------------------------------------------------- drain
        console.print("stopping the lanes and draining telemetry into ClickHouse ...")
        agent_stop.set()
        for th in agent_threads:
            th.join(30)
        for c in list(children.all):
            if c.name.startswith(("sidecar", "planner")) or c.name == "backends":
                children.stop(c)
        time.sleep(2.5)  # the last scores and decisions of what was sent
        for c in list(children.all):
            if c.name.startswith(("executor", "worker")) or c.name == "bundles":
                children.stop(c)
        _drain_sink(chdb, children, stop)
        facts = {
            "scenario": {**sc.__dict__, "quick": sc.live_seconds < 120},
            "trace": str(trace), "t0": t0, "t_live": t_live, "t_end": t_end,
            "started": started, "chdb": str(chdb), "capacities": capacities,
            "edge_capacity_rps": edge_cap, "mirror_capacity_rps": 40.0,
            "degrade_window": sc.degrade_window(t0, t_live),
            "degraded_endpoint": live["predictive"][sc.degrade_endpoint].id,
            "spike_windows": sc.spike_windows(t0, t_live),
            "client": {p: {"sent": s.sent, "ok": s.ok, "errors": s.errors,
                           "dropped": s.dropped, "by_endpoint": s.by_endpoint}
                       for p, s in gen.stats.items()},
            "arrivals": len(arrivals),
            # Every lane shares this machine's CPUs: over about 1.5 runnable processes per
            # CPU the latencies measure the contention more than the policies.
            "machine": {"cpus": os.cpu_count() or 1, "load_1m_at_live_start": load_before,
                        "load_1m_at_live_end": os.getloadavg()[0]},
            "scores_seen": watch.count,
            "scores_seen_by_lane": {lane: w.count for lane, w in zip(pipes, watches,
                                                                     strict=True)},
        }
        return facts
    finally:
        agent_stop.set()
        for th in agent_threads:
            th.join(30)
        client_agents.clear()
        for w in watches:
            w.close()
        if children is not None:
            children.stop_all()
        for d in exec_dirs.values():
            kill_recorded(d) if (d / "state.json").exists() else None
        broker.stop()
        left = _leftovers(out_dir, ports)
        if left:
            import psutil

            for item in left:
                with contextlib.suppress(psutil.Error, ValueError):
                    psutil.Process(int(item.split()[0])).kill()
            console.print(f"[red]killed {len(left)} leftover process(es):[/red] {left}")
        else:
            console.print("everything stopped: no process of the demo is left")
        if facts is not None:
            facts["leftover_processes"] = len(left)


def _drain_sink(chdb: Path, children: Children, stop: threading.Event) -> None:
    """Wait until the sink has stored everything (lag 0, nothing new for 2 s), stop it."""
    sink = next(c for c in children.all if c.name == "sink")
    admin = chdb.parent / f"{chdb.name}.admin.json"
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not stop.is_set():
        try:
            info = json.loads(admin.read_text())
            st = _http_json(f"{info['url']}/status", 2.0, info.get("token", ""))
            lag = sum(v for v in (st.get("lag") or {}).values() if isinstance(v, int | float))
            n = int(st["stats"].get("records", 0))
        except (OSError, ValueError, KeyError, TypeError):
            lag, n = 1, last
        if n != last or lag:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 2.0:
            break
        time.sleep(0.3)
    children.stop(sink, 60)


class _LiveView:
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
            w = _http_json(f"http://127.0.0.1:{self.sport[('predictive', 'central')][1]}"
                           "/weights")[scn.API]
            self.weights = {e: v["weight"] for e, v in w["endpoints"].items()}
            self.policy = w.get("policy", "")
            h = _http_json(f"http://127.0.0.1:{self.sport[('predictive', 'edge')][1]}/health")
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
