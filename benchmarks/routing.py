"""Does prediction beat reaction? A routing-quality benchmark (discrete-event simulation).

Two scenarios (``benchmarks/routing_sim/scenarios.py`` says exactly what they are):

1. **Calibration**: Linkerd's "Beyond Round Robin" experiment (11 backends, 167 ms median,
   one backend at 2 s for 30 s, 1,000 qps, success = answered within 1 s). The simulator
   must land within half a point of the published 95 / 99 / 99.9 % before scenario 2
   counts.
2. **Main**: 8 heterogeneous backends with worker slots, queues, deadlines and shedding
   under a seasonal ramp, a sudden x2 spike and one backend degrading x4 for two minutes.
   Policies: round-robin, static capacity-weighted, least-request (P2C), peak-EWMA (P2C),
   predictive (the project's real agent -> processor -> sidecar code on a simulated clock),
   an oracle (true capacities and future load, no delay), and one labelled experiment
   (``predictive-capw``: the same scores, weights multiplied by configured capacity).

3. **Pre-scaling** (``routing_sim/prescale.py``): capacity that takes 2-5 intervals to come
   up; the Kubernetes HPA + peak-EWMA vs loadcast (forecast + planner rule + predictive)
   vs the persistence ablation vs an oracle, on the seasonal shape and the repository's
   trace (or ``--trace FILE``).
4. ``--real`` (``routing_real.py``): the same kind of run through the real sidecar
   (built-in proxy and HAProxy) to real aiohttp backends, side by side with the simulator.

Routing uses the sidecar's own ``Router`` and policy classes; telemetry goes through the
edge agent's ``TelemetryAggregator``; scores come from ``processors.endpoint.EndpointModel``
(``Stepper``, ``make_forecaster("default")``, ``CapacityEstimator``, ``load_score_record``);
weights from the sidecar's ``WeightTable`` (``streams.sidecar.routing_weights``).

Usage::

    python benchmarks/routing.py                  # 10 seeds, both scenarios (~2 min)
    python benchmarks/routing.py --quick          # 1 seed, main scenario at 1/4 time
    python benchmarks/routing.py --trace streams/traces/elb_request_count_8c0756.csv
    python benchmarks/routing.py --actuation-ms 500 --seeds 5
    python benchmarks/routing.py --only prescale --activation-intervals 5
    python benchmarks/routing.py --only main --seeds 1 --real   # + the real sidecar run
    python benchmarks/routing.py --only main --seeds 1 --real --real-seeds 3  # ~30 min

Prints tables and writes ``out/benchmarks/routing.json`` (see ``--out``). Latency figures
are medians over requests within a run, then mean and 95 % interval over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "out" / "benchmarks"
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):  # run as a script from anywhere
    if _p not in sys.path:
        sys.path.insert(0, _p)

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.routing_sim import prescale  # noqa: E402
from benchmarks.routing_sim.engine import OK  # noqa: E402
from benchmarks.routing_sim.metrics import aggregate, mean_ci, phase_metrics  # noqa: E402
from benchmarks.routing_sim.scenarios import (  # noqa: E402
    ABLATION,
    CALIBRATION_POLICIES,
    LINKERD_PUBLISHED,
    MAIN_POLICIES,
    VARIANTS,
    MainScenario,
    build,
    calibration_config,
)
from streams.edge.replay import ELB_TRACE, trace_path  # noqa: E402

TOLERANCE_POINTS = 0.5
QUICK_SCALE = 0.25
# Targets of the issue (predictive vs the baselines).
NEVER_WORSE = 1.02  # every phase, p99 vs peak-ewma and vs prequal
SPIKE_VS_BEST_REACTIVE = 0.9  # spike phase, p99 vs the better of the two
P99_VS_ROUND_ROBIN = 0.5
REACTIVE = ("peak-ewma", "prequal")
REACT_INTERVALS = 2.0


# -- jobs (run in worker processes) -------------------------------------------------------


def run_calibration(policy: str, seed: int, slow_factor: float | None = None) -> dict[str, Any]:
    """One calibration run: success rate (answered within 1 s) and tail latency."""
    sim, _ = build(policy, calibration_config(seed, slow_factor), None)
    r = sim.run()
    ok = r.outcome == OK
    return {
        "policy": policy, "seed": seed, "slow_factor": slow_factor,
        "success_pct": 100.0 * float(ok.mean()),
        "requests": int(r.rtt_ms.size),
        "p99_ms": float(np.percentile(r.rtt_ms, 99)),
        "p999_ms": float(np.percentile(r.rtt_ms, 99.9)),
        "slow_backend_requests": int((r.backend == 10).sum()),
    }


def run_main(policy: str, seed: int, scenario: MainScenario, timeline: bool) -> dict[str, Any]:
    """One main-scenario run: metrics per phase (and a per-second timeline if asked)."""
    load = scenario.load()
    sim, control = build(policy, scenario.config(seed, load), scenario, load)
    t0 = time.perf_counter()
    r = sim.run()
    out: dict[str, Any] = {
        "policy": policy, "seed": seed, "wall_s": time.perf_counter() - t0,
        "phases": {ph.name: phase_metrics(r, ph, scenario.slo_ms) for ph in scenario.phases()},
        "control": getattr(control, "summary", dict)(),
        "requests": int(r.rtt_ms.size),
    }
    if timeline:
        out["timeline"] = _timeline(r, [b.id for b in scenario.backends()])
    return out


def _timeline(r: Any, ids: list[str]) -> dict[str, Any]:
    """Per-second p99, errors + shed and offered rate; weights when they changed."""
    sec = r.t_arrival.astype(np.int64)
    n = math.ceil(r.duration_s)
    p99: list[float | None] = []
    bad: list[float] = []
    rate: list[int] = []
    order = np.argsort(sec, kind="stable")
    bounds = np.searchsorted(sec[order], np.arange(n + 1))
    for k in range(n):
        idx = order[bounds[k]:bounds[k + 1]]
        out = r.outcome[idx]
        served = out <= 2  # OK, TIMEOUT, EXPIRED
        lat = r.rtt_ms[idx][served]
        p99.append(round(float(np.percentile(lat, 99)), 1) if lat.size else None)
        bad.append(round(100.0 * float((out != OK).mean()), 2) if idx.size else 0.0)
        rate.append(int(idx.size))
    weights = [(round(t, 2), {k: round(v, 3) for k, v in w.items()}) for t, w in r.weights]
    return {"p99_ms": p99, "errors_plus_shed_pct": bad, "rate_rps": rate,
            "weights": weights[:2000], "backends": ids}


def _job(args: tuple[str, Any]) -> dict[str, Any]:
    kind, a = args
    if kind == "cal":
        return run_calibration(*a)
    if kind == "pre":
        lane, seed, sc, label = a
        return {**prescale.run_lane(lane, seed, sc), "load": label}
    return run_main(*a)


# -- aggregation --------------------------------------------------------------------------


def summarize_calibration(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"reference": {
        "source": "https://linkerd.io/2016/03/16/beyond-round-robin-load-balancing-for-latency/",
        "published_success_pct": LINKERD_PUBLISHED,
        "setup": "11 backends, latency median 167 ms sd 5 ms, 1000 qps (1 per ms), 60 s, "
                 "one backend fixed at 2 s from 15 s to 45 s, success = latency <= 1 s",
    }, "policies": {}, "variant_slow_x10": {}}
    for pol in CALIBRATION_POLICIES:
        for key, factor in (("policies", None), ("variant_slow_x10", 10.0)):
            rs = [r for r in runs if r["policy"] == pol and r["slow_factor"] == factor]
            if not rs:
                continue
            agg = aggregate([{k: r[k] for k in ("success_pct", "p99_ms", "p999_ms",
                                                 "slow_backend_requests")} for r in rs])
            mean = agg["success_pct"]["mean"]
            agg["published_pct"] = LINKERD_PUBLISHED[pol]
            agg["diff_points"] = mean - LINKERD_PUBLISHED[pol]
            agg["within_tolerance"] = abs(mean - LINKERD_PUBLISHED[pol]) <= TOLERANCE_POINTS
            out[key][pol] = agg
    out["all_within_tolerance"] = all(v["within_tolerance"] for v in out["policies"].values())
    return out


def summarize_main(runs: list[dict[str, Any]], scenario: MainScenario) -> dict[str, Any]:
    pols: dict[str, Any] = {}
    for pol in MAIN_POLICIES:
        rs = sorted((r for r in runs if r["policy"] == pol), key=lambda r: r["seed"])
        if not rs:
            continue
        pols[pol] = {
            "variant": pol in VARIANTS,
            "phases": {ph: aggregate([r["phases"][ph] for r in rs]) for ph in rs[0]["phases"]},
            "control": rs[0]["control"],
            "wall_s_median": float(np.median([r["wall_s"] for r in rs])),
            "requests_median": float(np.median([r["requests"] for r in rs])),
        }
        if "timeline" in rs[0]:
            pols[pol]["timeline_seed0"] = rs[0]["timeline"]
    return {"scenario": scenario.describe(), "policies": pols,
            "comparisons": compare(runs, scenario)}


def _per_seed(runs: list[dict[str, Any]], pol: str, phase: str, key: str) -> dict[int, Any]:
    return {r["seed"]: r["phases"][phase][key] for r in runs if r["policy"] == pol}


def _ratio(runs: list[dict[str, Any]], a: str, b: str, phase: str, key: str) -> dict[str, Any]:
    """Per-seed ratio a/b of a metric: mean and 95 % interval, and the ratio of means."""
    xa, xb = _per_seed(runs, a, phase, key), _per_seed(runs, b, phase, key)
    seeds = sorted(s for s in xa if s in xb and xa[s] is not None and xb[s])
    ratios = [xa[s] / xb[s] for s in seeds]
    mean, half = mean_ci(ratios) if ratios else (None, None)
    ma = float(np.mean([xa[s] for s in seeds])) if seeds else None
    mb = float(np.mean([xb[s] for s in seeds])) if seeds else None
    return {"mean": mean, "ci95": half, "ratio_of_means": (ma / mb) if ma and mb else None,
            "values": ratios}


def _best_reactive(runs: list[dict[str, Any]], phase: str) -> str:
    """The better (lower mean p99) of peak-ewma and prequal in ``phase``."""
    means = {p: float(np.mean(list(_per_seed(runs, p, phase, "p99_ms").values()) or [math.inf]))
             for p in REACTIVE}
    return min(means, key=lambda p: means[p])


def _err_diff(runs: list[dict[str, Any]], a: str, b: str, phase: str) -> dict[str, Any]:
    mine = _per_seed(runs, a, phase, "errors_plus_shed_pct")
    theirs = _per_seed(runs, b, phase, "errors_plus_shed_pct")
    diff = [mine[s] - theirs[s] for s in sorted(mine) if s in theirs]
    m, h = mean_ci(diff) if diff else (None, None)
    return {"mean": m, "ci95": h, "values": diff}


def compare(runs: list[dict[str, Any]], scenario: MainScenario) -> dict[str, Any]:
    """The issue's comparisons, for the predictive policy, the ablation and the experiment."""
    out: dict[str, Any] = {}
    iv = scenario.interval_s
    have = {r["policy"] for r in runs}
    for pred in ("predictive", ABLATION, "predictive-capw"):
        if pred not in have:
            continue
        c: dict[str, Any] = {}
        for phase in ("spike", "degraded", "steady"):
            best = _best_reactive(runs, phase)
            c[phase] = {
                "p99_vs_peak_ewma": _ratio(runs, pred, "peak-ewma", phase, "p99_ms"),
                "p99_vs_prequal": _ratio(runs, pred, "prequal", phase, "p99_ms"),
                "best_reactive": best,
                "p99_vs_best_reactive": _ratio(runs, pred, best, phase, "p99_ms"),
                "p99_vs_round_robin": _ratio(runs, pred, "round-robin", phase, "p99_ms"),
                "p99_vs_oracle": _ratio(runs, pred, "oracle", phase, "p99_ms"),
            }
            for other in ("peak-ewma", "prequal", "oracle"):
                c[phase][f"errors_plus_shed_minus_{other.replace('-', '_')}_points"] = (
                    _err_diff(runs, pred, other, phase))
            if phase != "steady":
                react = list(_per_seed(runs, pred, phase, "time_to_react_s").values())
                got = [v for v in react if v is not None]
                c[phase]["time_to_react_intervals"] = {
                    "mean": float(np.mean(got)) / iv if got else None,
                    "max": max(got) / iv if got else None,
                    "never": len(react) - len(got)}
        sp = c["spike"]
        never = sp["time_to_react_intervals"]["never"] + c["degraded"][
            "time_to_react_intervals"]["never"]
        worst = max((c[p]["time_to_react_intervals"]["max"] or 0.0)
                    for p in ("spike", "degraded"))
        phases = ("steady", "spike", "degraded")

        def _not_higher(x: dict[str, Any]) -> bool:  # mean difference within its interval
            return x["mean"] is not None and x["mean"] - (x["ci95"] or 0.0) <= 0.0

        c["checks"] = {
            "every_phase_p99_le_1.02x_peak_ewma": all(
                _le(c[p]["p99_vs_peak_ewma"]["mean"], NEVER_WORSE) for p in phases),
            "every_phase_p99_le_1.02x_prequal": all(
                _le(c[p]["p99_vs_prequal"]["mean"], NEVER_WORSE) for p in phases),
            "every_phase_errors_not_higher_than_peak_ewma_and_prequal": all(
                _not_higher(c[p][f"errors_plus_shed_minus_{o}_points"])
                for p in phases for o in ("peak_ewma", "prequal")),
            "spike_p99_le_0.9x_better_reactive": _le(
                sp["p99_vs_best_reactive"]["mean"], SPIKE_VS_BEST_REACTIVE),
            "spike_p99_le_0.5x_round_robin": _le(sp["p99_vs_round_robin"]["mean"],
                                                 P99_VS_ROUND_ROBIN),
            "time_to_react_le_2_intervals": never == 0 and worst <= REACT_INTERVALS,
        }
        out[pred] = c
    if "predictive" in out and ABLATION in out:
        out["ablation"] = {ph: _where(out, ph) for ph in ("steady", "spike", "degraded")}
    if "prequal" in have and "round-robin" in have:
        out["prequal_sanity"] = {ph: _ratio(runs, "prequal", "round-robin", ph, "p99_ms")
                                 for ph in ("steady", "spike", "degraded")}
    return out


def _where(c: dict[str, Any], phase: str) -> dict[str, Any]:
    """Where the ablation lands between predictive and the better reactive policy (p99):
    share of predictive's gain that the forecast accounts for (1 = all of it)."""
    pred = c["predictive"][phase]["p99_vs_best_reactive"]["ratio_of_means"]
    abl = c[ABLATION][phase]["p99_vs_best_reactive"]["ratio_of_means"]
    if pred is None or abl is None:
        return {"predictive": pred, "ablation": abl, "forecast_share": None, "label": "-"}
    gain = 1.0 - pred
    share = (abl - pred) / gain if abs(gain) > 1e-3 else None
    if abs(abl - pred) <= 0.01:
        label = "= predictive (the forecast adds nothing here)"
    elif pred < abl < 1.0:
        label = "between"
    elif abl >= 1.0 > pred:
        label = "at/over reactive (the gain is the forecast's)"
    else:
        label = "better than predictive" if abl < pred else "worse than both"
    return {"predictive": pred, "ablation": abl, "forecast_share": share, "label": label}


def _le(x: float | None, bound: float) -> bool:
    return x is not None and x <= bound


# -- output -------------------------------------------------------------------------------


def _fmt(agg: dict[str, Any] | None, digits: int = 0, ci: bool = True) -> str:
    if agg is None or agg.get("mean") is None:
        never = (agg or {}).get("never")
        return f"never ({never})" if never else "-"
    s = f"{agg['mean']:.{digits}f}"
    if ci and agg.get("ci95"):
        s += f" ±{agg['ci95']:.{digits}f}"
    if agg.get("never"):
        s += f" ({agg['never']} never)"
    return s


def print_tables(console: Console, res: dict[str, Any]) -> None:
    cal = res.get("calibration")
    if cal:
        t = Table(title=f"Calibration: Linkerd 'Beyond Round Robin' ({res['seeds']} seeds)")
        for col in ("policy", "success % (≤1 s)", "Linkerd", "diff", "ok",
                    "p99 ms", "p99.9 ms", "slow x10 variant %"):
            t.add_column(col, justify="right" if col != "policy" else "left")
        for pol, a in cal["policies"].items():
            var = cal["variant_slow_x10"].get(pol)
            t.add_row(pol, _fmt(a["success_pct"], 3), f"{a['published_pct']:.1f}",
                      f"{a['diff_points']:+.3f}", "yes" if a["within_tolerance"] else "NO",
                      _fmt(a["p99_ms"], 0, False), _fmt(a["p999_ms"], 0, False),
                      _fmt(var["success_pct"], 3, False) if var else "-")
        console.print(t)
    main = res.get("main")
    if not main:
        return
    for phase in ("steady", "spike", "degraded"):
        t = Table(title=f"Main scenario, {phase} phase (mean ±95 % CI over {res['seeds']} "
                        "seeds; latency in ms)")
        cols = ["policy", "p50", "p95", "p99", "p99 median", "p99.9", "errors %", "shed %",
                "util max/avg", "churn"]
        if phase != "steady":
            cols += ["react s", "recover s"]
        for c in cols:
            t.add_column(c, justify="left" if c == "policy" else "right")
        for pol, p in main["policies"].items():
            a = p["phases"][phase]
            util = (f"{a['util_max']['mean']:.2f}/{a['util_avg']['mean']:.2f}"
                    if a["util_max"]["mean"] is not None else "-")
            row = [pol + (" (experiment)" if p["variant"] else ""), _fmt(a["p50_ms"], 0, False),
                   _fmt(a["p95_ms"], 0, False), _fmt(a["p99_ms"]),
                   f"{a['p99_ms']['median']:.0f}" if a["p99_ms"].get("median") else "-",
                   _fmt(a["p999_ms"], 0, False),
                   _fmt(a["errors_pct"], 2), _fmt(a["shed_pct"], 2), util,
                   _fmt(a["weight_churn"], 3, False)]
            if phase != "steady":
                row += [_fmt(a["time_to_react_s"], 1, False),
                        _fmt(a["time_to_recover_s"], 1, False)]
            t.add_row(*row)
        console.print(t)
    t = Table(title="Predictive vs the others (per-seed ratios: mean ±95 % CI)")
    for c in ("policy", "phase", "p99 / peak-ewma", "p99 / prequal", "p99 / better",
              "p99 / round-robin", "p99 / oracle", "err+shed − peak-ewma (pts)",
              "err+shed − prequal (pts)", "react (intervals)"):
        t.add_column(c, justify="left" if c in ("policy", "phase") else "right")
    comps = main["comparisons"]
    for pred in ("predictive", ABLATION, "predictive-capw"):
        if pred not in comps:
            continue
        c = comps[pred]
        for phase in ("steady", "spike", "degraded"):
            x = c[phase]
            react = x.get("time_to_react_intervals")
            t.add_row(pred, phase, _fmt(x["p99_vs_peak_ewma"], 2), _fmt(x["p99_vs_prequal"], 2),
                      f"{_fmt(x['p99_vs_best_reactive'], 2)} ({x['best_reactive']})",
                      _fmt(x["p99_vs_round_robin"], 2), _fmt(x["p99_vs_oracle"], 2),
                      _fmt(x["errors_plus_shed_minus_peak_ewma_points"], 2),
                      _fmt(x["errors_plus_shed_minus_prequal_points"], 2),
                      "-" if react is None else (
                          f"{react['mean']:.2f} (max {react['max']:.2f})"
                          if react["mean"] is not None else f"never ({react['never']})"))
    console.print(t)
    if "ablation" in comps:
        t = Table(title=f"Ablation: {ABLATION} (persistence forecast) vs predictive, "
                        "p99 / better reactive (ratio of means)")
        for c in ("phase", "predictive", "ablation", "forecast's share of the gain", "where"):
            t.add_column(c, justify="left" if c in ("phase", "where") else "right")
        for phase, a in comps["ablation"].items():
            t.add_row(phase, _num(a["predictive"]), _num(a["ablation"]),
                      _num(a["forecast_share"]), a["label"])
        console.print(t)
    if "prequal_sanity" in comps:
        console.print("Prequal sanity check (heterogeneous pool, p99 prequal / round-robin): "
                      + ", ".join(f"{ph} {_fmt(a, 2)}"
                                  for ph, a in comps["prequal_sanity"].items()))


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 seed; main scenario at 1/4 time (a few seconds)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per policy (default 10)")
    ap.add_argument("--only", choices=("all", "calibration", "main", "prescale"),
                    default="all")
    ap.add_argument("--trace", type=Path, default=None,
                    help="timestamp,value CSV (or one count per line for the pre-scaling "
                         "scenario) replayed (compressed) as the load shape")
    ap.add_argument("--real", action="store_true",
                    help="also send the same kind of arrivals through the real sidecar "
                         "(built-in proxy and HAProxy) to real loopback backends, side by "
                         "side with the simulation (about 10 minutes; needs haproxy)")
    ap.add_argument("--real-planes", default="proxy,haproxy",
                    help="data planes for --real (comma-separated: proxy, haproxy)")
    ap.add_argument("--real-seed", type=int, default=0,
                    help="first seed of the --real arrivals (and of its simulation)")
    ap.add_argument("--real-seeds", type=int, default=1,
                    help="--real runs per (data plane, policy), seeds from --real-seed on; "
                         "p99 and errors over their requests pooled (about 9 minutes each)")
    ap.add_argument("--plan-band", type=float, default=0.3,
                    help="pre-scaling: plan for the forecast's mean + this share of the way "
                         "to its upper band (default 0.3; 0 = the mean)")
    ap.add_argument("--event-band", type=float, default=1.0,
                    help="pre-scaling: when the forecast's mean crosses what the always-on "
                         "instances serve, plan for its mean + this share of the way to its "
                         "upper band (default 1.0: the upper band; 0.3 = as --plan-band)")
    ap.add_argument("--activation-intervals", type=float, default=3.0,
                    help="pre-scaling: intervals new capacity takes to serve (2-5; default 3)")
    ap.add_argument("--actuation-ms", type=float, default=50.0,
                    help="data-plane actuation delay for new weights (default 50)")
    ap.add_argument("--telemetry-lag-s", type=float, default=0.5)
    ap.add_argument("--score-lag-s", type=float, default=0.5)
    ap.add_argument("--interval-s", type=float, default=5.0, help="telemetry interval")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=OUT_DIR / "routing.json")
    args = ap.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    if args.trace is not None and not args.trace.is_file():
        console.print(f"[red]--trace: no such file: {args.trace}[/red]")
        return 2
    for name in ("actuation_ms", "telemetry_lag_s", "score_lag_s"):
        if getattr(args, name) < 0:
            console.print(f"[red]--{name.replace('_', '-')} must be >= 0[/red]")
            return 2
    if not 0.0 <= args.plan_band <= 1.0 or not 0.0 <= args.event_band <= 1.0:
        console.print("[red]--plan-band and --event-band must be in [0, 1][/red]")
        return 2
    if not 0 < args.activation_intervals <= 20:
        console.print("[red]--activation-intervals must be in (0, 20][/red]")
        return 2
    if args.real and not set(args.real_planes.split(",")) <= {"proxy", "haproxy"}:
        console.print("[red]--real-planes: proxy and/or haproxy[/red]")
        return 2
    if args.interval_s <= 0 or (args.seeds is not None and args.seeds < 1) \
            or not 1 <= args.real_seeds <= 20:
        console.print("[red]--interval-s must be > 0, --seeds >= 1 and --real-seeds in "
                      "1-20[/red]")
        return 2
    seeds = args.seeds or (1 if args.quick else 10)
    scenario = MainScenario(
        scale=QUICK_SCALE if args.quick else 1.0, trace=args.trace,
        interval_s=args.interval_s, telemetry_lag_s=args.telemetry_lag_s,
        score_lag_s=args.score_lag_s, actuation_s=args.actuation_ms / 1000.0,
    )
    # pre-scaling: the seasonal shape and the repository's trace, or only --trace FILE
    pre_loads: list[tuple[str, Path | None]] = (
        [(f"trace:{args.trace.name}", args.trace)] if args.trace is not None
        else [("seasonal", None)] if args.quick
        else [("seasonal", None), (f"trace:{ELB_TRACE}", trace_path(ELB_TRACE))])
    pre_scens = {label: prescale.PrescaleScenario(
        scale=QUICK_SCALE if args.quick else 1.0, trace=path, interval_s=args.interval_s,
        activation_intervals=args.activation_intervals, plan_band=args.plan_band,
        event_band=args.event_band)
        for label, path in pre_loads}
    try:
        if args.only != "prescale":
            scenario.load()  # a bad trace fails here, with its line
        if args.only in ("all", "prescale"):
            for sc in pre_scens.values():
                sc.load()
    except ValueError as e:
        console.print(f"[red]--trace: {e}[/red]")
        return 2

    jobs: list[tuple[str, Any]] = []
    if args.only in ("all", "calibration"):
        jobs += [("cal", (p, s, None)) for p in CALIBRATION_POLICIES for s in range(seeds)]
        jobs += [("cal", (p, s, 10.0)) for p in CALIBRATION_POLICIES for s in range(seeds)]
    if args.only in ("all", "main"):
        # the slow predictive jobs first, so two workers finish together
        order = sorted(MAIN_POLICIES, key=lambda p: not p.startswith("predictive"))
        jobs += [("main", (p, s, scenario, s == 0)) for p in order for s in range(seeds)]
    if args.only in ("all", "prescale"):
        jobs += [("pre", (lane, s, sc, label)) for label, sc in pre_scens.items()
                 for lane in prescale.LANES for s in range(seeds)]
    t0 = time.perf_counter()
    if args.workers > 1:
        with ProcessPoolExecutor(max_workers=args.workers) as ex:
            results = list(ex.map(_job, jobs))
    else:
        results = [_job(j) for j in jobs]
    elapsed = time.perf_counter() - t0

    res: dict[str, Any] = {
        "benchmark": "routing",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick, "seeds": seeds, "workers": args.workers,
        "elapsed_s": round(elapsed, 2),
    }
    cal_runs = [r for j, r in zip(jobs, results, strict=True) if j[0] == "cal"]
    main_runs = [r for j, r in zip(jobs, results, strict=True) if j[0] == "main"]
    if cal_runs:
        res["calibration"] = summarize_calibration(cal_runs)
    if main_runs:
        res["main"] = summarize_main(main_runs, scenario)
    pre_runs = [r for j, r in zip(jobs, results, strict=True) if j[0] == "pre"]
    if pre_runs:
        res["prescale"] = {label: prescale.summarize(
            [r for r in pre_runs if r["load"] == label], sc) for label, sc in pre_scens.items()}
    checks: dict[str, Any] = {}
    if cal_runs:
        checks["calibration_within_0.5_points"] = res["calibration"]["all_within_tolerance"]
    if main_runs:
        comps = res["main"]["comparisons"]
        checks.update(comps.get("predictive", {}).get("checks", {}))
        if "prequal_sanity" in comps:
            checks["prequal_beats_round_robin_every_phase"] = all(
                _le(a["mean"], 1.0) for a in comps["prequal_sanity"].values())
    for label, p in res.get("prescale", {}).items():
        for k, v in p.get("checks", {}).items():
            checks[f"{k} ({label})"] = v
    res["checks"] = checks
    print_tables(console, res)
    for label, p in res.get("prescale", {}).items():
        prescale.print_table(console, p, label)
    if args.real:
        from benchmarks import routing_real

        planes = tuple(x.strip() for x in args.real_planes.split(",") if x.strip())
        res["real"] = routing_real.main_real(console, args.real_seed, planes,
                                             args.real_seeds)
        for plane, phases in res["real"]["order"].items():
            checks[f"real_{plane}_same_order_as_simulation_every_phase"] = all(
                c["same"] for c in phases.values())
            checks[f"real_{plane}_same_order_up_to_ties_every_phase"] = all(
                c["same_with_ties"] for c in phases.values())
    for k, v in checks.items():
        console.print(f"  {k}: {'[green]yes[/green]' if v else '[red]NO[/red]'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=_json_default))
    print(f"{len(jobs)} runs in {elapsed:.1f} s; wrote {args.out}")
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())
