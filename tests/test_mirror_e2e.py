"""Predictive mirroring end to end, on the real embedded broker, with real processes:

a replayed trace with a regional ramp (edge agent) -> the forecasting worker (`loadcast
worker`) -> the planner (`loadcast planner`) activates a mirror ahead of the ramp -> the
executor (`loadcast executor`) fetches the pushed bundle from `loadcast bundle serve` and
starts the API on 127.0.0.1 -> the sidecar (in process) routes the region's requests to
it -> after the ramp the planner retires it -> the sink stores it all and `loadcast query
mirror-lead-time` reports the lead time.

The trace: a season of 60 s (1 s steps): 20 rps, a ramp from position 15 to 160 rps by
position 25 (crossing the 100 rps central capacity at about position 20), 160 rps to
position 35, back down by 40, flat again. Four seasons of history are replayed flat out
(so the seasonal forecaster knows the pattern), then one season live at real speed with
event time = wall time. The planner starts after the history is scored, so it sees only
live scores (history scores are stale by then: the processor would score a backlog the
same way after an outage, and acting on it would be wrong).
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from benchmarks.support.processes import kafka_env
from processors.signing import Verifier, generate_keypair
from schemas.codec import Codec
from sinks.service import serve as serve_sink
from sinks.settings import SinkSettings
from streams.edge.agent import build_agent, zero_host_stats
from streams.edge.replay import read_trace, replay
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from streams.sidecar.app import Sidecar
from streams.sidecar.config import SidecarSettings
from streams.sidecar.testing import BackendProcess
from tests.kafka_helpers import read_topic
from tests.mirror_helpers import (
    bundle_server,
    cleanup_instances,
    processes_in,
    push_fixture,
    start_executor,
    statuses,
    stop,
)

pytestmark = pytest.mark.slow

SEASON = 60
HISTORY_SEASONS = 4
LIVE_SECONDS = 50  # the live season up to after the retire
ENDPOINT = "echo-api-edge-1-1"
CAPACITY = 100.0
COOLDOWN = 6.0


def season_value(pos: int) -> float:
    if pos < 15 or pos >= 40:
        return 20.0
    if pos < 25:
        return 20.0 + 14.0 * (pos - 14)
    if pos < 35:
        return 160.0
    return 160.0 - 28.0 * (pos - 34)


def write_trace(path: Path, start_s: int, seasons: int, seconds: int | None = None) -> Path:
    rng = random.Random(start_s)
    n = seconds if seconds is not None else seasons * SEASON
    with path.open("w") as f:
        f.write("timestamp,value\n")
        for i in range(n):
            v = max(0.0, season_value(i % SEASON) * (1 + rng.uniform(-0.04, 0.04)))
            f.write(f"{start_s + i},{round(v)}\n")
    return path


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen([sys.executable, "-m", "loadcast", *args], env=env,
                                stdout=f, stderr=subprocess.STDOUT)


def scores_of(kafka: KafkaSettings, codec: Codec, endpoint: str) -> list[dict[str, Any]]:
    msgs = read_topic(kafka.bootstrap_servers, topic_name(kafka, "load-scores"), 5)
    out = [codec.decode(m.value() or b"", "LoadScore") for m in msgs]
    return sorted((s for s in out if s["endpoint_id"] == endpoint),
                  key=lambda s: s["computed_at"])


def wait_until(cond: Any, timeout: float, what: str, procs: list[Any] = ()) -> Any:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        for p in procs:
            assert p.poll() is None, f"{p.args} exited with {p.returncode}"
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def probe(port: int, until: float, out: list[tuple[float, str, int, str]]) -> None:
    """Requests from region edge-1 (and a few from the sidecar's own region) at ~25/s."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as cs:
        i = 0
        while time.time() < until:
            region = "central" if i % 5 == 4 else "edge-1"
            t = time.time()
            async with cs.get(f"http://127.0.0.1:{port}/x",
                              headers={"X-Loadcast-Region": region}) as r:
                body = await r.read()
                who = r.headers.get("X-Endpoint", "")
                if r.status != 200:
                    who = body.decode(errors="replace")[:200]
                out.append((t, who, r.status, region))
            i += 1
            await asyncio.sleep(0.04)


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_ramp_activates_mirror_ahead_routes_to_it_and_retires(
    kafka: KafkaSettings, codec: Codec, tmp_path: Path
) -> None:
    private, public = generate_keypair()
    store, work = tmp_path / "store", tmp_path / "work"
    digest = push_fixture(store)
    bundle_dir = work / "bundles" / digest.split(":")[1]
    procs: dict[str, subprocess.Popen[Any]] = {}
    sidecar: Sidecar | None = None
    agent = build_agent(kafka, codec, agent_id="edge-1-agent", region="edge-1",
                        interval_seconds=1.0, host_stats=zero_host_stats, idle_windows=2)
    stop_replay = threading.Event()
    with bundle_server(store) as store_url, BackendProcess({"central-1": 0}) as central:
        try:
            worker_env = kafka_env(
                kafka, LOADCAST_PROCESSOR__APP_ID=f"w-{kafka.topic_prefix}",
                LOADCAST_PROCESSOR__STEP_SECONDS="1",
                LOADCAST_PROCESSOR__SEASON_SECONDS=str(SEASON),
                LOADCAST_PROCESSOR__LATENESS_SECONDS="0",
                LOADCAST_PROCESSOR__HORIZON="15",
                LOADCAST_PROCESSOR__SNAPSHOT_EVERY_SECONDS="5",
                LOADCAST_PROCESSOR__CAPACITY_RPS=json.dumps({ENDPOINT: CAPACITY}),
            )
            procs["worker"] = start(["worker"], worker_env, tmp_path / "worker.log")
            procs["executor"] = start_executor(
                kafka, region="edge-1", work_dir=work, store_url=store_url,
                public_key=public, log=tmp_path / "executor.log", drain=1.0)
            settings = SidecarSettings(
                upstreams=[{"id": "central-1", "url": central.urls["central-1"],
                            "api": "echo-api"}],
                listen_port=0, admin_port=0, region="central", telemetry_interval_s=1.0,
                mirror_lookahead_s=5.0, mirror_hosts=["127.0.0.1"],
                shed_overload=1000.0)  # load shedding of the central API is not tested here
            sidecar = Sidecar(settings, kafka, codec=codec)
            await sidecar.start()

            # The worker is up once it scores a probe window (region central: not planned).
            probe_agent = build_agent(kafka, codec, agent_id="probe", region="central",
                                      interval_seconds=1.0, host_stats=zero_host_stats)
            probe_agent.record("probe-1", 5.0, 200, api="probe", at=time.time() - 3)
            probe_agent.close()
            await asyncio.to_thread(wait_until, lambda: scores_of(kafka, codec, "probe-1"),
                                    90, "the worker's first score", [procs["worker"]])

            # History, flat out, ending where the live season starts.
            t_live = int(time.time()) + 3
            hist = read_trace(write_trace(tmp_path / "history.csv",
                                          t_live - HISTORY_SEASONS * SEASON, HISTORY_SEASONS))
            await asyncio.to_thread(replay, hist, agent.record, agent.tick, [ENDPOINT],
                                    api="echo-api")
            agent.tick(t_live)
            await asyncio.to_thread(
                wait_until,
                lambda: any(s["forecast"] and s["forecast"][0]["at"] >= (t_live - 2) * 1000
                            for s in scores_of(kafka, codec, ENDPOINT)),
                60, "the history to be scored", [procs["worker"]])

            planner_env = kafka_env(
                kafka, LOADCAST_MIRROR__SIGNING_KEY=private, LOADCAST_MIRROR__KEY_ID="k1",
                LOADCAST_MIRROR__PLANNER_APP_ID=f"p-{kafka.topic_prefix}",
                LOADCAST_MIRROR__BUNDLES=json.dumps(
                    {"echo-api": {"digest": digest, "instance_capacity_rps": 500}}),
                LOADCAST_MIRROR__ACTIVATION_SECONDS="2", LOADCAST_MIRROR__MARGIN_SECONDS="2",
                LOADCAST_MIRROR__COOLDOWN_SECONDS=str(COOLDOWN),
                LOADCAST_MIRROR__TICK_SECONDS="0.5",
            )
            procs["planner"] = start(["--log-level", "INFO", "planner"], planner_env,
                                     tmp_path / "planner.log")

            # The live season, in real time; requests through the sidecar meanwhile.
            await asyncio.sleep(max(0.0, t_live - time.time()))
            live = read_trace(write_trace(tmp_path / "live.csv", t_live, 1, LIVE_SECONDS))
            replayer = threading.Thread(
                target=replay, args=(live, agent.record, agent.tick, [ENDPOINT]),
                kwargs={"api": "echo-api", "speedup": 1.0, "stop": stop_replay}, daemon=True)
            replayer.start()
            responses: list[tuple[float, str, int, str]] = []
            await probe(sidecar.port, t_live + LIVE_SECONDS + 1, responses)
            await asyncio.to_thread(replayer.join, 10)
            agent.close()
            for name, p in procs.items():
                assert p.poll() is None, f"{name} died: see {tmp_path}/{name}.log"
            mirror_view = sidecar.health()["mirrors"]
        finally:
            stop_replay.set()
            if sidecar is not None:
                await sidecar.stop()
            for p in procs.values():
                stop(p)
            cleanup_instances(work)

    # ------------------------------------------------------------- what happened
    cmds_raw = read_topic(kafka.bootstrap_servers, topic_name(kafka, "mirror-commands"), 5)
    cmds = [codec.decode(m.value() or b"", "MirrorCommand") for m in cmds_raw]
    assert [c["action"] for c in cmds] == ["ACTIVATE", "RETIRE"], cmds
    activate, retire = cmds
    verifier = Verifier({"k1": public})
    for c in cmds:
        verifier.verify(c)
        assert c["region"] == "edge-1" and c["api"] == "echo-api" and c["bundle_digest"] == digest
    assert activate["issued_at"] > t_live * 1000 and activate["desired_instances"] == 1
    assert retire["issued_at"] - activate["issued_at"] >= COOLDOWN * 1000
    sts = [s for s in statuses(kafka, codec) if s["command_id"] == activate["command_id"]]
    assert [s["state"] for s in sts] == ["ACCEPTED", "STARTING", "READY"]
    ready = sts[-1]
    url = ready["instance_url"]
    assert url.startswith("http://127.0.0.1:") and ready["capacity_rps"] == 500.0
    after = [s["state"] for s in statuses(kafka, codec)
             if s["command_id"] == retire["command_id"]]
    assert after == ["ACCEPTED", "DRAINING", "RETIRED"]
    retired_at = next(s["at"] for s in statuses(kafka, codec) if s["state"] == "RETIRED")
    assert not processes_in(bundle_dir), "the mirror process is stopped"

    # Lead time: ready before demand crossed central capacity, both as predicted (the
    # triggering forecast) and as it happened (the first live score over capacity).
    predicted_cross = next(p["at"] for p in activate["forecast"]
                           if p["mean"] > activate["central_capacity_rps"])
    live_scores = [s for s in scores_of(kafka, codec, ENDPOINT)
                   if s["computed_at"] >= t_live * 1000]
    crossed = next(s["computed_at"] for s in live_scores if s["current_rps"] > CAPACITY)
    lead = (crossed - ready["at"]) / 1000
    activation = (ready["at"] - activate["issued_at"]) / 1000
    print(f"\nactivation {activation:.2f} s, lead {lead:.2f} s (actual crossing), "
          f"{(predicted_cross - ready['at']) / 1000:.2f} s (predicted crossing); "
          f"command at live +{activate['issued_at'] / 1000 - t_live:.1f} s: "
          f"{activate['reason']}")
    assert lead > 0, f"mirror ready {-lead:.2f} s after demand crossed capacity"
    assert predicted_cross > ready["at"]
    assert lead < 15, "not absurdly early either (the horizon is 15 s)"

    # Routing: edge-1's requests went to the mirror while it was ready and demand was
    # predicted over capacity (all of them in the 160 rps phase), to central otherwise;
    # requests of the sidecar's own region always to central; no errors.
    failed = [(round(t - t_live, 1), who, reg) for t, who, st, reg in responses if st != 200]
    assert not failed, failed
    mirror_name = f"echo-api@edge-1:{url.rsplit(':', 1)[1]}"
    by_who = {who for _, who, _, _ in responses}
    assert by_who == {"central-1", mirror_name}, by_who
    to_mirror = [t for t, who, _, _ in responses if who == mirror_name]
    assert min(to_mirror) >= ready["at"] / 1000 and max(to_mirror) <= retired_at / 1000
    high = [who for t, who, _, reg in responses
            if reg == "edge-1" and t_live + 27 <= t <= t_live + 33]
    assert high and all(w == mirror_name for w in high), high
    early = [who for t, who, _, reg in responses if t < t_live + 10]
    assert early and set(early) == {"central-1"}
    assert all(who == "central-1" for _, who, _, reg in responses if reg == "central")
    assert all(who == "central-1" for t, who, _, _ in responses if t > retired_at / 1000)
    assert isinstance(mirror_view, dict)

    # The sink stores everything; `loadcast query mirror-lead-time` reports the same lead.
    sink_settings = SinkSettings(dsn=f"chdb://{tmp_path}/ch", group_id=f"s-{kafka.topic_prefix}",
                                 batch_max_seconds=0.3, admin_enabled=False)
    sink_stop, sinks = threading.Event(), []
    sink_thread = threading.Thread(
        target=serve_sink, args=(kafka, sink_settings, sink_stop),
        kwargs={"on_ready": lambda sink, admin: sinks.append(sink)}, daemon=True)
    sink_thread.start()
    try:
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until it has stored everything (quiet 2 s)
            n = sinks[0].stats.records if sinks else 0
            if n != last:
                last, since = n, time.monotonic()
            elif n > 0 and time.monotonic() - since > 2.0:
                break
            await asyncio.sleep(0.2)
    finally:
        sink_stop.set()
        await asyncio.to_thread(sink_thread.join, 30)
    env = kafka_env(kafka, LOADCAST_SINK__DSN=sink_settings.dsn)
    r = subprocess.run([sys.executable, "-m", "loadcast", "query", "mirror-lead-time",
                        "--since", "1h", "--lookback", "5", "-f", "json", "--via", "direct"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["command_id"] for row in rows] == [activate["command_id"]]
    assert rows[0]["lead_seconds"] == pytest.approx(lead, abs=0.002)
    assert rows[0]["region"] == "edge-1" and rows[0]["executor_id"] == "ex-edge-1"
