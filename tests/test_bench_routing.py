"""The routing benchmark runs end to end (--quick), and its simulator behaves."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks.routing_sim.backends import BackendSpec, ServiceTime  # noqa: E402
from benchmarks.routing_sim.engine import (  # noqa: E402
    EXPIRED,
    OK,
    SHED_BACKEND,
    TIMEOUT,
    SimConfig,
    Simulation,
)
from benchmarks.routing_sim.loadshape import LoadShape  # noqa: E402
from benchmarks.routing_sim.scenarios import build, calibration_config  # noqa: E402


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "routing.py"), "--out", str(out), *extra],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )


def test_routing_quick_writes_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "routing.json"
    proc = _run(out, "--quick")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    res: dict[str, Any] = json.loads(out.read_text())
    cal = res["calibration"]["policies"]
    assert set(cal) == {"round-robin", "least-request", "peak-ewma"}
    # Round robin sends 1/11 of a minute's traffic to a 2 s backend for half of it.
    assert cal["round-robin"]["success_pct"]["mean"] == pytest.approx(95.45, abs=0.05)
    assert cal["round-robin"]["within_tolerance"]
    assert cal["peak-ewma"]["success_pct"]["mean"] > cal["least-request"]["success_pct"][
        "mean"] > cal["round-robin"]["success_pct"]["mean"]
    pols = res["main"]["policies"]
    assert {"round-robin", "static-weighted", "least-request", "peak-ewma", "prequal",
            "predictive", "predictive-persistence", "oracle"} <= set(pols)
    for p in pols.values():
        assert set(p["phases"]) == {"steady", "spike", "degraded"}
        spike = p["phases"]["spike"]
        for key in ("p50_ms", "p95_ms", "p99_ms", "p999_ms", "errors_pct", "shed_pct",
                    "util_max", "util_avg", "weight_churn", "time_to_react_s",
                    "time_to_recover_s"):
            assert key in spike
        assert spike["p50_ms"]["mean"] <= spike["p99_ms"]["mean"] <= spike["p999_ms"]["mean"]
    # The predictive run really went through the processor and the weight table.
    ctl = pols["predictive"]["control"]
    assert ctl["windows"] > 0 and ctl["scores_published"] > 0 and ctl["weight_changes"] > 0
    # Round robin ignores the degraded backend: errors; the oracle does not.
    deg = {k: v["phases"]["degraded"] for k, v in pols.items()}
    assert deg["round-robin"]["errors_pct"]["mean"] > 1.0
    assert deg["oracle"]["errors_pct"]["mean"] < deg["round-robin"]["errors_pct"]["mean"]
    assert set(res["checks"]) >= {"calibration_within_0.5_points",
                                  "every_phase_p99_le_1.02x_peak_ewma",
                                  "every_phase_p99_le_1.02x_prequal",
                                  "spike_p99_le_0.9x_better_reactive",
                                  "prequal_beats_round_robin_every_phase",
                                  "time_to_react_le_2_intervals"}
    # the pre-scaling scenario: every lane measured, the reactive autoscaler is the reference
    pre = res["prescale"]["seasonal"]
    assert set(pre["lanes"]) == {"hpa+peak-ewma", "loadcast", "loadcast-persistence", "oracle"}
    for lane in pre["lanes"].values():
        for key in ("slo_violation_s", "spike_p99_ms", "spike_errors_pct", "instance_s"):
            assert lane[key]["median"] is not None
        assert lane["spikes_crossing"] == 2  # the same spikes cross for every lane
    lanes = pre["lanes"]
    assert lanes["hpa+peak-ewma"]["slo_violation_s"]["mean"] > 0  # reaction is late
    assert lanes["oracle"]["slo_violation_s"]["mean"] <= lanes["hpa+peak-ewma"][
        "slo_violation_s"]["mean"]
    assert "label" in pre["ablation"]
    comps = res["main"]["comparisons"]
    # the ablation (persistence forecast) ran through the pipeline and is placed
    assert pols["predictive-persistence"]["control"]["scores_published"] > 0
    assert set(comps["ablation"]) == {"steady", "spike", "degraded"}
    assert comps["prequal_sanity"]["degraded"]["mean"] < 1.0  # prequal avoids the slow one
    assert all(isinstance(v, bool) for v in res["checks"].values())


def test_prescale_reads_one_count_per_line(tmp_path: Path) -> None:
    from benchmarks.routing_sim.prescale import load_trace

    f = tmp_path / "counts.txt"
    f.write_text("5\n7\n\n9\n")
    ts, ys = load_trace(f)
    assert list(ys) == [5.0, 7.0, 9.0] and list(ts) == [0.0, 1.0, 2.0]
    f.write_text("5\nlots\n")
    with pytest.raises(ValueError, match=r"counts\.txt:2: bad value"):
        load_trace(f)


def test_bad_trace_is_refused_with_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,value\n2024-01-01T00:00:00,5\n2024-01-01T00:05:00,lots\n")
    proc = _run(tmp_path / "r.json", "--quick", "--trace", str(bad))
    assert proc.returncode == 2
    assert "bad.csv:3" in proc.stdout and "bad value" in proc.stdout
    assert not (tmp_path / "r.json").exists()


def _one_backend(rate: float, slots: int, queue: int, seed: int = 0,
                 seconds: float = 20.0) -> Any:
    spec = BackendSpec("b0", slots, ServiceTime("lognormal", 0.1, 0.2), queue)
    cfg = SimConfig([spec], LoadShape.constant(rate, seconds), seed=seed, deadline_s=1.0)
    return Simulation(cfg, "round-robin").run()


def test_saturated_backend_queues_then_sheds() -> None:
    # 2 slots at ~100 ms: ~20 rps capacity; offered 60 rps.
    r = _one_backend(60.0, slots=2, queue=6)
    out = r.outcome
    assert (out == SHED_BACKEND).sum() > 0.4 * out.size  # about 2/3 can't be served
    served = r.rtt_ms[out == OK]
    assert np.median(served) > 250  # they waited in a queue of 6 behind 2 slots
    assert r.busy[0, 2:18].mean() == pytest.approx(2.0, abs=0.05)  # both slots always busy
    # Below capacity nothing is shed and latency is the service time.
    calm = _one_backend(5.0, slots=2, queue=6)
    assert (calm.outcome == OK).all()
    assert np.median(calm.rtt_ms) == pytest.approx(100, rel=0.1)


def test_queued_requests_past_their_deadline_are_dropped_not_served() -> None:
    r = _one_backend(60.0, slots=2, queue=1000, seconds=10.0)
    assert (r.outcome == EXPIRED).sum() > 0
    assert (r.outcome == SHED_BACKEND).sum() == 0
    assert (r.rtt_ms[r.outcome == EXPIRED] > 1000).all()
    # what was served was served within its deadline or counted as a timeout
    assert (r.rtt_ms[r.outcome == OK] <= 1000).all()
    assert (r.rtt_ms[r.outcome == TIMEOUT] > 1000).all()


def test_same_seed_same_run_other_seed_other_run() -> None:
    a = _one_backend(30.0, slots=4, queue=8, seed=3)
    b = _one_backend(30.0, slots=4, queue=8, seed=3)
    c = _one_backend(30.0, slots=4, queue=8, seed=4)
    assert np.array_equal(a.rtt_ms, b.rtt_ms) and np.array_equal(a.outcome, b.outcome)
    assert not np.array_equal(a.rtt_ms[:100], c.rtt_ms[:100])


def test_calibration_round_robin_and_peak_ewma_match_linkerd() -> None:
    rates = {}
    for pol in ("round-robin", "peak-ewma"):
        sim, _ = build(pol, calibration_config(seed=0), None)
        r = sim.run()
        assert r.rtt_ms.size == 60_000
        rates[pol] = 100.0 * float((r.outcome == OK).mean())
    assert abs(rates["round-robin"] - 95.0) <= 0.5
    assert abs(rates["peak-ewma"] - 99.9) <= 0.5


def test_real_backends_have_slots_a_bounded_queue_and_shed() -> None:
    import asyncio
    import time

    import aiohttp

    from benchmarks.routing_real import RealScenario, backends

    sc = RealScenario(slots=(1,), queue_per_slot=1, median_s=0.3, sigma=0.0,
                      degrade_backend=5)

    async def burst(url: str) -> list[int]:
        async with aiohttp.ClientSession() as s:
            async def one() -> int:
                async with s.get(url) as r:
                    await r.read()
                    return r.status
            return await asyncio.gather(*(one() for _ in range(4)))

    with backends(sc, time.time()) as urls:
        t0 = time.monotonic()
        got = asyncio.run(burst(urls["r0"] + "/x"))
        took = time.monotonic() - t0
    assert sorted(got) == [200, 200, 503, 503]  # one slot, one queued, two shed at once
    assert took >= 0.55  # the queued one waited for the slot: two service times in a row


def test_prescale_planner_sizes_a_predicted_crossing_for_its_upper_band() -> None:
    from benchmarks.routing_sim.prescale import PrescaleScenario, ScalingControl

    sc = PrescaleScenario(scale=0.2)
    ctl = ScalingControl(sc, "forecast", sc.load())
    per = sc.instance_rps * sc.target_util  # what one instance serves at the target
    on = sc.min_instances * per  # ... and the always-on pool
    # below the always-on pool: mean + 0.3 of the way to the upper band
    ctl.forecast = [(sc.step_s, 0.5 * on, 0.5 * on + 10 * per)]
    assert ctl._needed(0.0) == math.ceil((0.5 * on + 3 * per) / per)
    # a predicted crossing: the whole upper band (capped by the pool only later)
    ctl.forecast = [(sc.step_s, 1.2 * on, 1.2 * on + 2 * per)]
    assert ctl._needed(0.0) == math.ceil((1.2 * on + 2 * per) / per)
    # points past the lead time + one step are not planned for
    ctl.forecast = [(sc.lead_s + 2 * sc.step_s, 5 * on, 6 * on)]
    assert ctl._needed(0.0) == 0
