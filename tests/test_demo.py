"""`loadcast demo --quick` end to end: a real run of every part (broker, worker, sink,
planner, executor, bundle server, six sidecars, simulated backends, load generator), then
the summary's fields and values, the report's embedded charts, and no process left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

POLICIES = ("predictive", "round-robin", "peak-ewma")
PHASES = ("overall", "steady", "degraded", "spike")


def _left_behind(out: Path) -> list[str]:
    me = os.getpid()
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        try:
            if p.pid == me or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info.get("cmdline") or [])
            if str(out) in cmd or (p.info.get("cwd") or "").startswith(str(out)):
                left.append(f"{p.pid}: {cmd[:150]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return left


@pytest.mark.timeout(300)
def test_quick_demo_writes_summary_and_report_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    try:
        r = subprocess.run([sys.executable, "-m", "loadcast", "demo", "--quick", "--out",
                            str(out)], capture_output=True, text=True, timeout=240)
    finally:
        left = _left_behind(out)
        for item in left:  # never leave them to the next test
            psutil.Process(int(item.split(":")[0])).kill()
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert not left, left

    s = json.loads((out / "summary.json").read_text())
    assert s["quick"] is True and s["leftover_processes"] == 0
    assert 30 <= s["live_seconds"] <= 90 and 0 < s["duration_s"] < 240
    assert s["arrivals"] > 300
    for p in POLICIES:
        lg = s["load_generator"][p]
        assert lg["sent"] == s["arrivals"] and lg["ok"] + lg["errors"] + lg["dropped"] \
            == lg["sent"]
        stats = s["policies"][p]
        for region in ("all", "central", "edge"):
            for ph in PHASES:
                st = stats[region][ph]
                assert isinstance(st["requests"], int) and st["requests"] >= 0
                if st["requests"]:
                    assert 0 <= st["error_rate"] <= 1
                    assert 1 <= st["p99_ms"] < 10_000
        # client telemetry in ClickHouse covers (nearly) every request the lane answered
        assert stats["all"]["overall"]["requests"] >= 0.9 * (lg["ok"] + lg["errors"])
        for region in ("central", "edge"):
            series = s["series"]["p99_ms"][p][region]
            assert len(series) >= 0.7 * s["live_seconds"]
            assert all(isinstance(t, float | int) and v >= 0 for t, v in series)
    fc = s["series"]["forecast"]
    assert set(fc) == {"orders-central-1", "orders-central-2", "orders-central-3",
                       "orders-edge-1", "orders-edge-2"}
    for pts in fc.values():
        assert len(pts) >= 0.5 * s["live_seconds"]
        assert all(lo <= mean <= hi for _, _, mean, lo, hi in pts)
    assert {r["horizon"] for r in s["forecast_accuracy"]} >= {1, 5, 15}
    w = s["series"]["weights"]["predictive-central"]
    assert {"orders-central-1", "orders-central-2", "orders-central-3"} <= set(w)
    assert all(0 <= v <= 1 for pts in w.values() for _, v in pts)
    hl = s["headline"]
    for base in ("round-robin", "peak-ewma"):
        assert hl[f"p99_ratio_vs_{base}_overall"] > 0
    assert isinstance(hl["predictive_wins"], bool) and hl["statements"]
    if not hl["predictive_wins"]:
        assert any("does NOT beat" in x for x in hl["statements"])
    for a in s["mirrors"]["activations"]:
        assert a["region"] == "edge" and a["api"] == "orders"
    assert 0 <= s["mirrors"]["share_of_edge_requests"] <= 1

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "forecast vs actual" in page.lower() and "mirror" in page.lower()
