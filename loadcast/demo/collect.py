"""The end of the demo's run: stop the lanes in order, drain the telemetry into
ClickHouse, and gather the facts the report is drawn from (:mod:`loadcast.demo.report`
queries the rest from the sink's tables)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from loadcast.demo import scenario as scn
from loadcast.demo.lanes import MIRROR_CAPACITY_RPS, Topology
from loadcast.demo.processes import Children, http_json
from loadcast.demo.traffic import ClientAgents, LiveRun


def drain(children: Children, clients: ClientAgents, chdb: Path, stop: threading.Event,
          console: Console) -> None:
    """Stop the client agents, the sidecars, planners and backends, then (after the last
    scores and decisions) the executors, workers and bundle server; drain the sink."""
    console.print("stopping the lanes and draining telemetry into ClickHouse ...")
    clients.close()
    for c in list(children.all):
        if c.name.startswith(("sidecar", "planner")) or c.name == "backends":
            children.stop(c)
    time.sleep(2.5)  # the last scores and decisions of what was sent
    for c in list(children.all):
        if c.name.startswith(("executor", "worker")) or c.name == "bundles":
            children.stop(c)
    _drain_sink(chdb, children, stop)


def _drain_sink(chdb: Path, children: Children, stop: threading.Event) -> None:
    """Wait until the sink has stored everything (lag 0, nothing new for 2 s), stop it."""
    sink = next(c for c in children.all if c.name == "sink")
    admin = chdb.parent / f"{chdb.name}.admin.json"
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not stop.is_set():
        try:
            info = json.loads(admin.read_text())
            st = http_json(f"{info['url']}/status", 2.0, info.get("token", ""))
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


def facts(sc: scn.Scenario, trace: Path, chdb: Path, started: float, t0: float,
          topo: Topology, run: LiveRun, scores_seen: dict[str, int]) -> dict[str, Any]:
    """What the report is drawn from, besides the sink's tables."""
    return {
        "scenario": {**sc.__dict__, "quick": sc.live_seconds < 120},
        "trace": str(trace), "t0": t0, "t_live": run.t_live, "t_end": run.t_end,
        "started": started, "chdb": str(chdb), "capacities": topo.capacities,
        "edge_capacity_rps": topo.edge_capacity, "mirror_capacity_rps": MIRROR_CAPACITY_RPS,
        "degrade_window": sc.degrade_window(t0, run.t_live),
        "degraded_endpoint": run.live["predictive"][sc.degrade_endpoint].id,
        "spike_windows": sc.spike_windows(t0, run.t_live),
        "client": {p: {"sent": s.sent, "ok": s.ok, "errors": s.errors,
                       "dropped": s.dropped, "by_endpoint": s.by_endpoint}
                   for p, s in run.gen.stats.items()},
        "arrivals": run.arrivals,
        # Every lane shares this machine's CPUs: over about 1.5 runnable processes per
        # CPU the latencies measure the contention more than the policies.
        "machine": {"cpus": os.cpu_count() or 1, "load_1m_at_live_start": run.load_before,
                    "load_1m_at_live_end": os.getloadavg()[0],
                    "arrivals_sent_late": run.gen.late_arrivals,
                    "max_send_lateness_s": round(run.gen.max_late_s, 3),
                    "latest_arrival_at_s": round(run.gen.max_late_at, 1),
                    "live_start_steps": run.start_steps},
        "scores_seen": scores_seen["predictive"],
        "scores_seen_by_lane": scores_seen,
    }
