"""The demo's lanes and pipelines, started as child processes: the two forecasting
pipelines (``predictive`` on the default topics, the ``predictive-persistence`` ablation on
topics of its own), the sink, the bundle server, the executors and planners, and a central
and an edge sidecar per policy lane, each lane on its own simulated backends."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadcast.demo import scenario as scn
from loadcast.demo.processes import Children, DemoError
from processors.signing import generate_keypair
from streams.bundles import DirectoryStore, push
from streams.kafka.broker import free_port
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import ensure_topics

MIRROR_BUNDLE = Path(__file__).parent / "mirror_api"
#: Requests per second one mirror instance of the demo's API serves.
MIRROR_CAPACITY_RPS = 40.0


@dataclass(frozen=True)
class Pipe:
    """One forecasting pipeline: its Kafka settings, the variables that point a child
    process at its topics, and the suffix of its processes' names."""

    kafka: KafkaSettings
    env: dict[str, str]
    suffix: str


def make_pipes(k: KafkaSettings, bootstrap: str) -> dict[str, Pipe]:
    """The two pipelines on the broker at ``bootstrap``, their topics created (``k`` is
    pointed at the broker: the predictive lane's settings)."""
    k.bootstrap_servers = bootstrap
    k.partitions = 4
    ensure_topics(k)
    # The ablation lane's pipeline: the same processes on topics of their own.
    kpp = k.model_copy(update={"topic_prefix": f"{k.topic_prefix}pp.", "partitions": 1})
    ensure_topics(kpp)
    return {"predictive": Pipe(k, {}, ""),
            "predictive-persistence": Pipe(kpp, {
                "LOADCAST_KAFKA__TOPIC_PREFIX": kpp.topic_prefix,
                "LOADCAST_KAFKA__PARTITIONS": "1"}, "-pp")}


def child_env(k: KafkaSettings) -> dict[str, str]:
    """Every child's environment: this one's, pointed at the demo's broker."""
    return {**os.environ,
            "LOADCAST_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
            "LOADCAST_KAFKA__TOPIC_PREFIX": k.topic_prefix,
            "LOADCAST_KAFKA__PARTITIONS": str(k.partitions),
            "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Topology:
    """Each lane's backends and the ports of everything that listens."""

    lanes: dict[str, list[scn.BackendSpec]]  # ports and capacities; slow-down when live
    backend_port: dict[str, int]
    sidecar_ports: dict[tuple[str, str], tuple[int, int]]  # (lane, region) -> (data, admin)

    @property
    def ports(self) -> list[int]:
        return [*self.backend_port.values(), *(x for pr in self.sidecar_ports.values()
                                               for x in pr)]

    @property
    def edge_capacity(self) -> float:
        """The edge region's central capacity: its endpoints' in the predictive lane."""
        return sum(s.capacity_rps for s in self.lanes["predictive"] if s.region == scn.EDGE)

    @property
    def capacities(self) -> dict[str, float]:
        return {s.id: s.capacity_rps for s in self.lanes["predictive"]}


def topology(sc: scn.Scenario) -> Topology:
    lanes = scn.backends(sc, 0.0, 0.0)
    return Topology(
        lanes, {s.id: free_port() for specs in lanes.values() for s in specs},
        {(p, r): (free_port(), free_port()) for p in scn.POLICIES
         for r in (scn.CENTRAL, scn.EDGE)})


def start_pipelines(children: Children, pipes: dict[str, Pipe], topo: Topology,
                    sc: scn.Scenario, work: Path, chdb: Path,
                    exec_dirs: dict[str, Path]) -> dict[str, dict[str, str]]:
    """Start the workers, the sink, the bundle server, the executors (waiting until each
    is ready) and every sidecar; the environment of each pipeline's mirroring (its
    planner's, started once the history is scored)."""
    private, public = generate_keypair()
    digest, _ = push(MIRROR_BUNDLE, DirectoryStore(work / "store"))
    _start_workers(children, pipes, topo, sc)
    # the sink may lag during the live part (the report waits for it to drain): the
    # lanes' requests and the load generator come first on a busy machine. If it dies it
    # is started again, as a service manager would: it resumes from its committed offsets
    # (embedded chDB crashed it once in CI, SIGSEGV; the summary lists every restart)
    children.start("sink", ["sink", "--admin-port", "0"], {
        "LOADCAST_SINK__DSN": f"chdb://{chdb}", "LOADCAST_SINK__GROUP_ID": "demo-sink",
        "LOADCAST_SINK__BATCH_MAX_SECONDS": "1"}, nice=10, restarts=2)
    store = children.start("bundles", ["bundle", "serve", "--store", str(work / "store"),
                                       "--port", "0"], stdout_pipe=True)
    store_url = children.line(store, 60)
    lane_env = {lane: {**_mirror_env(private, public, digest, topo.edge_capacity), **p.env,
                       "LOADCAST_MIRROR__EXECUTOR_ID": f"executor-edge{p.suffix}",
                       "LOADCAST_MIRROR__PLANNER_APP_ID": f"demo-planner{p.suffix}"}
                for lane, p in pipes.items()}
    for lane, p in pipes.items():
        executor = children.start(f"executor{p.suffix}", [
            "--log-level", "INFO", "executor", "--region", scn.EDGE, "--work-dir",
            str(exec_dirs[lane]), "--store-url", store_url, "--stop-instances-on-exit"],
            lane_env[lane], stdout_pipe=True)
        if children.line(executor, 90) != "ready":
            raise DemoError(f"executor did not start: see {executor.log}")
    _start_sidecars(children, pipes, topo)
    return lane_env


def _start_workers(children: Children, pipes: dict[str, Pipe], topo: Topology,
                   sc: scn.Scenario) -> None:
    for lane, p in pipes.items():
        children.start(f"worker{p.suffix}", ["worker"], {
            **p.env,
            "LOADCAST_PROCESSOR__APP_ID": f"demo-worker{p.suffix}",
            "LOADCAST_PROCESSOR__FORECASTER": "persistence" if p.suffix else "default",
            "LOADCAST_PROCESSOR__STEP_SECONDS": "1",
            "LOADCAST_PROCESSOR__SEASON_SECONDS": str(sc.season_s),
            "LOADCAST_PROCESSOR__LATENESS_SECONDS": "0",
            "LOADCAST_PROCESSOR__HORIZON": "15",
            # The global trees refit by data time: over the replayed compressed days they
            # would fit while the worker catches up and push its live scores seconds late
            # on 2 CPUs (the quick demo's test lost half its forecast points).
            "LOADCAST_PROCESSOR__GLOBAL_TREES": "false",
            "LOADCAST_PROCESSOR__SNAPSHOT_EVERY_SECONDS": "5",
            "LOADCAST_PROCESSOR__CAPACITY_RPS": json.dumps(
                {s.id: s.capacity_rps for s in topo.lanes[lane]}),
        })


def _mirror_env(private: str, public: str, digest: str, edge_cap: float) -> dict[str, str]:
    return {
        "LOADCAST_MIRROR__SIGNING_KEY": private, "LOADCAST_MIRROR__KEY_ID": "demo",
        "LOADCAST_MIRROR__TRUSTED_KEYS": json.dumps({"demo": public}),
        "LOADCAST_MIRROR__EXECUTOR_ID": "executor-edge",
        "LOADCAST_MIRROR__DRAIN_SECONDS": "1",
        "LOADCAST_MIRROR__PLANNER_APP_ID": "demo-planner",
        "LOADCAST_MIRROR__BUNDLES": json.dumps(
            {scn.API: {"digest": digest, "instance_capacity_rps": MIRROR_CAPACITY_RPS}}),
        "LOADCAST_MIRROR__CENTRAL_CAPACITY_RPS": json.dumps({scn.API: edge_cap}),
        "LOADCAST_MIRROR__ACTIVATION_SECONDS": "2", "LOADCAST_MIRROR__MARGIN_SECONDS": "2",
        "LOADCAST_MIRROR__COOLDOWN_SECONDS": "8", "LOADCAST_MIRROR__TICK_SECONDS": "0.5",
    }


def _start_sidecars(children: Children, pipes: dict[str, Pipe], topo: Topology) -> None:
    for (policy, region), (port, admin) in topo.sidecar_ports.items():
        ups = [{"id": s.id, "url": f"http://127.0.0.1:{topo.backend_port[s.id]}",
                "api": scn.API, "region": region, "capacity_rps": s.capacity_rps}
               for s in topo.lanes[policy] if s.region == region]
        args = ["sidecar", "--port", str(port), "--admin-port", str(admin)]
        if policy not in scn.PREDICTIVE:
            args.append("--no-kafka")  # a reactive baseline: no scores, no mirrors
        children.start(f"sidecar-{policy}-{region}", args,
                       {**sidecar_env(policy, region, ups, topo.edge_capacity),
                        **(pipes[policy].env if policy in pipes else {})})


def start_planners(children: Children, pipes: dict[str, Pipe],
                   lane_env: dict[str, dict[str, str]]) -> None:
    for lane, p in pipes.items():
        children.start(f"planner{p.suffix}", ["--log-level", "INFO", "planner"],
                       lane_env[lane])


def sidecar_env(policy: str, region: str, upstreams: list[dict[str, Any]],
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
        "LOADCAST_SIDECAR__MIRROR_HOSTS": '["127.0.0.1"]',  # the demo's mirrors run here
        "LOADCAST_SIDECAR__CENTRAL_CAPACITY_RPS": json.dumps({scn.API: edge_capacity}),
    }
    return env
