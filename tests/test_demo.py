"""`loadcast demo --quick` end to end: a real run of every part (broker, two workers, sink,
two planners and executors, bundle server, eight sidecars, simulated backends, load
generator), then the summary's fields and values, every headline claim against the
summary's numbers, the report's embedded charts, and no process left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from loadcast.demo.headline import MIN_WINDOWS, intervals, phase_at

pytestmark = pytest.mark.slow

POLICIES = ("predictive", "predictive-persistence", "round-robin", "peak-ewma")
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
    # only the sink may be restarted (it resumes from its offsets); each restart is listed
    assert all(r["part"] == "sink" and r["exit_code"] != 0 for r in s["restarts"])
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
    _check_claims(s)
    # both predictive lanes ran on a forecasting pipeline of their own
    assert all(s["scores_seen_by_lane"][p] > 0 for p in ("predictive", "predictive-persistence"))
    assert hl["predictive_wins"] == (not any(c["verdict"] == "lost" for c in hl["claims"]
                                             if c["kind"] != "machine"))
    for a in s["mirrors"]["activations"]:
        assert a["region"] == "edge" and a["api"] == "orders"
    assert 0 <= s["mirrors"]["share_of_edge_requests"] <= 1

    page = (out / "report.html").read_text()
    for st in hl["statements"]:  # the page says what the summary says, in its colour
        assert f"<li class='{st['tone']}'>" in page
    assert "predictive-persistence" in page
    assert page.count("data:image/png;base64,") == 4
    assert "forecast vs actual" in page.lower() and "mirror" in page.lower()


def _verdict(c: dict[str, Any], err: float, base_err: float, tol: dict[str, Any]) -> str:
    ratio, ci, dci = c["ratio"], c["p99_ratio_ci95"], c["error_diff_ci95"]
    if ci is None:  # too few seconds for an interval: no win or loss
        return "tie"
    assert ci[0] <= ci[1] and dci[0] <= dci[1]
    lat = (-1 if ratio < 1 - tol["p99_ratio"] and ci[1] < 1 else
           1 if ratio > 1 + tol["p99_ratio"] and ci[0] > 1 else 0)
    er = (-1 if err < base_err - tol["error_rate"] and dci[1] < 0 else
          1 if err > base_err + tol["error_rate"] and dci[0] > 0 else 0)
    if lat > 0 or er > 0:
        return "lost"
    return "won" if lat < 0 or er < 0 else "tie"


def _check_claims(s: dict[str, Any]) -> None:
    """Every headline line stands on claims, every claim on the summary's numbers: the
    numbers are there, equal the summary's tables, and give the claim's verdict; a line is
    green only where nothing it claims was lost and something was won."""
    hl, tol = s["headline"], s["headline"]["tolerance"]
    claims = {c["id"]: c for c in hl["claims"]}
    assert len(claims) == len(hl["claims"]) and hl["statements"]
    groups = {st["group"] for st in hl["statements"]}
    assert groups == {"all", "central", "edge"}
    for base in ("peak-ewma", "round-robin", "predictive-persistence"):  # ablation included
        for g in ("central", "edge"):
            assert f"{g}:predictive-vs-{base}:overall" in claims
    for g in ("central", "edge"):
        for base in ("seasonal_naive", "persistence"):
            assert f"{g}:forecast-vs-{base}" in claims
    for lane, groups in s["series"]["errors"].items():  # the phase windows are the tables'
        for g, rows in groups.items():
            for ph in ("steady", "degraded", "spike"):
                n = sum(r[2] for r in rows if phase_at(r[0], s["phases"]) == ph)
                assert n == s["policies"][lane][g][ph]["requests"], (lane, g, ph)
    for c in claims.values():
        if c["kind"] == "latency":
            a = s["policies"][c["subject"]][c["group"]][c["phase"]]
            b = s["policies"][c["baseline"]][c["group"]][c["phase"]]
            assert c["p99_ms"] == a["p99_ms"] and c["baseline_p99_ms"] == b["p99_ms"]
            assert c["error_rate"] == a["error_rate"]
            assert c["baseline_error_rate"] == b["error_rate"]
            assert isinstance(c["ratio"], float) and c["p99_ms"] and c["baseline_p99_ms"]
            assert abs(c["ratio"] - a["p99_ms"] / b["p99_ms"]) < 0.002
            # the interval stands on the summary's per-second series and phase windows
            iv = intervals(s["series"], c["subject"], c["baseline"], c["group"], c["phase"],
                           s["phases"])
            assert {k: c[k] for k in iv} == iv
            assert c["windows"] >= MIN_WINDOWS or c["phase"] != "overall"
            assert c["verdict"] == _verdict(c, a["error_rate"] or 0.0,
                                            b["error_rate"] or 0.0, tol)
        elif c["kind"] == "forecast":
            st = s["forecast_skill"][{"demand": "groups", "planner": "planner_sums"}[
                c["series"]]][c["group"]]
            key = c["baseline"].replace("-", "_")
            assert c["mase"] == st[f"mase_vs_{key}"] and isinstance(c["mase"], float)
            assert st["points"] >= 0.25 * s["live_seconds"]  # the line says over how many
            assert abs(c["mase"] - st["mae"] / st[f"mae_{key}"]) < 0.002
            assert c["verdict"] == ("won" if c["mase"] <= tol["skill_target"] else "lost")
        elif c["kind"] == "coverage":
            cov = s["forecast_skill"]["groups"][c["group"]]["coverage"]
            lo, hi = tol["coverage_target"]
            assert c["coverage"] == cov and isinstance(cov, float)
            assert c["verdict"] == ("won" if lo <= cov <= hi else "lost")
        elif c["kind"] == "machine":
            m = s["machine"]
            per_cpu = max(m["load_1m_at_live_start"], m["load_1m_at_live_end"]) / m["cpus"]
            assert abs(c["load_per_cpu"] - per_cpu) < 0.01
            late = m["arrivals_sent_late"]  # the load generator kept its schedule or says so
            assert isinstance(late, int) and late >= 0 and m["max_send_lateness_s"] >= 0
            assert c["verdict"] == ("lost" if per_cpu > c["limit"] or late else "tie")
        else:
            assert c["kind"] == "mirror"
            acts = s["mirrors"]["activations"]
            leads = [a["lead_seconds"] for a in acts if a["lead_seconds"] is not None]
            assert c["activations"] == len(acts) and c["lead_seconds"] == leads
            assert c["ready_before"] == sum(1 for x in leads if x > 0)
            assert c["verdict"] == ("no data" if not leads else "won"
                                    if c["ready_before"] == len(leads) else "lost")
    for g, st in s["forecast_skill"]["groups"].items():
        if "vs_served" in st:  # a demand series' forecast: also shown against served requests
            line = next(x["text"] for x in hl["statements"]
                        if f"{g}:forecast-vs-persistence" in x["claims"])
            assert st["source"] in line
            assert f"MASE {st['vs_served']['mase_vs_seasonal_naive']} vs" in line, line
    for st in hl["statements"]:
        assert st["claims"] and all(i in claims for i in st["claims"]), st
        vs = [claims[i]["verdict"] for i in st["claims"]]
        assert st["tone"] == ("lose" if "lost" in vs else "win" if "won" in vs
                              else "neutral"), st
        for i in st["claims"]:  # the line shows the number its claim stands on
            c = claims[i]
            shown = {"latency": lambda c: f"x{c['ratio']:.2f}",
                     "forecast": lambda c: f"MASE {c['mase']}",
                     "coverage": lambda c: f"coverage {c['coverage']}",
                     "machine": lambda c: f"{c['load_per_cpu']:.2f} runnable",
                     "mirror": lambda c: "activation(s)" if c["activations"]
                     else "no edge mirror"}[c["kind"]](c)
            assert shown in st["text"], (shown, st["text"])
