"""The demo's report: ClickHouse queries over what the pipeline stored, the headline
numbers, ``summary.json``, and a self-contained ``report.html`` (matplotlib charts as
base64 PNGs).

Every number comes from the sink's tables (queried directly on the chDB directory once the
sink has stopped): the lanes' client-side latency and errors from the ``telemetry`` the
load generator's edge agents published, forecasts from ``forecast_points``, weights from
``routing_decisions``, mirrors from the ``mirror-lead-time`` canned query and
``mirror_commands``. Per-phase p99 is the request-weighted mean of the per-second window
p99s (as the canned ``latency`` query does per minute).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from loadcast.demo import scenario as scn
from loadcast.demo.loadgen import client_endpoint

HORIZON = 5  # the forecast horizon drawn against the actuals (steps = seconds)
PHASES = ("overall", "steady", "degraded", "spike")
COLORS = {"predictive": "#1f77b4", "predictive-persistence": "#9467bd",
          "round-robin": "#d62728", "peak-ewma": "#2ca02c"}
#: A ratio within this much of 1 is a tie ("no worse, within noise"), not a win or a loss.
TIE = 0.02
#: The forecast earns its place when its MAE is at most this share of each baseline's.
SKILL_TARGET = 0.85
COVERAGE_TARGET = (0.85, 0.95)
#: Runnable processes per CPU (1-min load average) above which the latency lines are
#: flagged: the simulated backends, sidecars and load generator all share the CPUs.
BUSY_LOAD_PER_CPU = 1.5


def _q(dsn: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    from sinks.service import query
    from sinks.settings import SinkSettings

    r = query(SinkSettings(dsn=dsn, admin_enabled=False), body, "direct")
    return [dict(zip(r.columns, row, strict=True)) for row in r.rows]


CLIENT_SQL = """
SELECT endpoint_id, region, toUnixTimestamp64Milli(window_start) AS t_ms,
  sum(request_count) AS n, sum(arraySum(mapValues(errors))) AS errors,
  max(latency_p99_ms) AS p99
FROM telemetry FINAL
WHERE api = {api:String} AND window_start >= fromUnixTimestamp64Milli({since:Int64})
GROUP BY endpoint_id, region, t_ms ORDER BY t_ms
"""
ACTUAL_SQL = """
SELECT endpoint_id, region, intDiv(toUnixTimestamp64Milli(window_start), 1000) AS t_s,
  sum(request_count) AS n
FROM telemetry FINAL
WHERE api = {api:String} AND window_start >= fromUnixTimestamp64Milli({since:Int64})
GROUP BY endpoint_id, region, t_s ORDER BY t_s
"""
FORECAST_SQL = """
SELECT endpoint_id, intDiv(toUnixTimestamp64Milli(at), 1000) AS t_s,
  argMax(mean, computed_at) AS mean, argMax(lower, computed_at) AS lower,
  argMax(upper, computed_at) AS upper
FROM forecast_points FINAL
WHERE api = {api:String} AND horizon = {h:UInt16}
  AND at >= fromUnixTimestamp64Milli({since:Int64})
  AND at < fromUnixTimestamp64Milli({until:Int64})
GROUP BY endpoint_id, t_s ORDER BY t_s
"""
WEIGHTS_SQL = """
SELECT sidecar_id, toUnixTimestamp64Milli(at) AS t_ms, w.1 AS endpoint_id, w.2 AS weight,
  stale, policy
FROM routing_decisions FINAL ARRAY JOIN CAST(weights, 'Array(Tuple(String, Float64))') AS w
WHERE kind = 'WEIGHTS' AND at >= fromUnixTimestamp64Milli({since:Int64})
ORDER BY t_ms
"""
COMMANDS_SQL = """
SELECT command_id, action, region, desired_instances, toUnixTimestamp64Milli(issued_at) AS t_ms,
  reason
FROM mirror_commands FINAL ORDER BY issued_at
"""
STATUS_SQL = """
SELECT command_id, state, toUnixTimestamp64Milli(at) AS t_ms, instance_url
FROM mirror_status FINAL ORDER BY at
"""


def _phase_stats(rows: list[dict[str, Any]], phase: Any) -> dict[str, dict[str, Any]]:
    """Per phase: requests, errors, error rate, request-weighted mean of window p99s."""
    acc: dict[str, list[float]] = {p: [0.0, 0.0, 0.0] for p in PHASES}
    for r in rows:
        n = float(r["n"])
        for p in ("overall", phase(r["t_ms"] / 1000)):
            acc[p][0] += n
            acc[p][1] += float(r["errors"])
            acc[p][2] += float(r["p99"]) * n
    return {p: {"requests": int(a[0]), "errors": int(a[1]),
                "error_rate": round(a[1] / a[0], 5) if a[0] else None,
                "p99_ms": round(a[2] / a[0], 1) if a[0] else None} for p, a in acc.items()}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def skill(actual: dict[int, float], forecast: dict[int, tuple[float, float, float]],
          season: int, h: int) -> dict[str, Any]:
    """How a forecast made ``h`` steps ahead did against the two naive forecasts at the same
    horizon, on the same points: seasonal-naive (the value one ``season`` back) and
    persistence (the value ``h`` back). ``mase_vs_*`` = the forecast's mean absolute error
    divided by that baseline's (below 1: the forecast is better); ``coverage`` = share of
    actuals inside the forecast's 90 % band. Points: every step with a forecast and the
    three actuals (``t``, ``t - h``, ``t - season``).

    >>> y = {t: float(t % 4 == 0) * 10 for t in range(-8, 12)}
    >>> f = {t: (y[t] + 1.0, y[t], y[t] + 2.0) for t in range(12)}
    >>> r = skill(y, f, season=4, h=1)
    >>> r["points"], r["mae"], r["mase_vs_persistence"], r["coverage"]
    (12, 1.0, 0.2, 1.0)
    >>> r["mae_seasonal_naive"], r["mase_vs_seasonal_naive"]   # a perfect season: no ratio
    (0.0, None)
    """
    pts = [t for t in sorted(forecast)
           if t in actual and t - h in actual and t - season in actual]
    if not pts:
        return {"points": 0, "mae": None, "mae_seasonal_naive": None,
                "mae_persistence": None, "mase_vs_seasonal_naive": None,
                "mase_vs_persistence": None, "coverage": None}
    n = len(pts)
    mae = sum(abs(forecast[t][0] - actual[t]) for t in pts) / n
    sn = sum(abs(actual[t - season] - actual[t]) for t in pts) / n
    pe = sum(abs(actual[t - h] - actual[t]) for t in pts) / n
    cov = sum(1 for t in pts if forecast[t][1] <= actual[t] <= forecast[t][2]) / n
    return {"points": n, "mae": round(mae, 3), "mae_seasonal_naive": round(sn, 3),
            "mae_persistence": round(pe, 3),
            "mase_vs_seasonal_naive": round(mae / sn, 3) if sn else None,
            "mase_vs_persistence": round(mae / pe, 3) if pe else None,
            "coverage": round(cov, 3)}


def forecast_skill(actual: list[dict[str, Any]], fc: list[dict[str, Any]],
                   capacities: dict[str, float], season: int, h: int,
                   t_from: int, t_to: int) -> dict[str, Any]:
    """Per client group (central, edge) and per endpoint: :func:`skill` of the live
    forecasts made ``h`` s ahead, in epoch seconds ``[t_from, t_to)``.

    A group's actual is its region's demand: the requests of all its endpoints, edge
    mirrors included (what a mirror serves is still the region's demand). Its forecast,
    in ``groups``: the sum of its regular endpoints' forecasts (mean and band); in
    ``planner_sums``: what the planner adds up (``processors.mirroring.DemandTable``), that
    plus each mirror's rate when the forecast was made, held flat (a mirror carries the
    region's demand, diverted).
    """
    region_of = {str(r["endpoint_id"]): str(r["region"]) for r in actual}
    by_ep: dict[str, dict[int, float]] = defaultdict(dict)
    group: dict[str, dict[int, float]] = {g: defaultdict(float) for g in (scn.CENTRAL, scn.EDGE)}
    for r in actual:
        t = int(r["t_s"])
        by_ep[r["endpoint_id"]][t] = float(r["n"])
        if r["region"] in group:
            group[r["region"]][t] += float(r["n"])
    fc_ep: dict[str, dict[int, tuple[float, float, float]]] = defaultdict(dict)
    for r in fc:
        t = int(r["t_s"])
        if t_from <= t < t_to:
            fc_ep[r["endpoint_id"]][t] = (float(r["mean"]), float(r["lower"]),
                                          float(r["upper"]))
    out: dict[str, Any] = {"horizon_s": h, "season_s": season, "groups": {},
                           "planner_sums": {}, "endpoints": {}}
    for g in (scn.CENTRAL, scn.EDGE):
        eps = [e for e in capacities if region_of.get(e, g if f"-{g}-" in e else "") == g]
        common = set.intersection(*(set(fc_ep[e]) for e in eps)) if eps else set()
        mirrors = [e for e in fc_ep if e not in capacities and region_of.get(e) == g]
        for key, ms in (("groups", []), ("planner_sums", mirrors)):
            summed = {t: tuple(sum(fc_ep[e][t][i] for e in eps) +
                               sum(by_ep[m].get(t - h, 0.0) for m in ms)
                               for i in range(3)) for t in common}
            out[key][g] = {"endpoints": eps, "mirrors": ms,
                           **skill(dict(group[g]), summed, season, h)}  # type: ignore[arg-type]
    for e in capacities:
        out["endpoints"][e] = skill(by_ep.get(e, {}), fc_ep.get(e, {}), season, h)
    return out


def query_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, from ClickHouse."""
    dsn = f"chdb://{facts['chdb']}"
    since = int(facts["t_live"] * 1000)
    until = int(facts["t_end"] * 1000) + 1
    sc = facts["scenario"]
    d0, d1 = facts["degrade_window"]
    spikes = [tuple(w) for w in facts["spike_windows"]]

    def phase(t: float) -> str:
        if d0 <= t < d1:
            return "degraded"
        if any(a <= t < b for a, b in spikes):
            return "spike"
        return "steady"

    client = _q(dsn, {"sql": CLIENT_SQL, "params": {"api": scn.CLIENT_API, "since": since}})
    policies: dict[str, Any] = {}
    p99_series: dict[str, dict[str, list[list[float]]]] = {}
    err_series: dict[str, dict[str, list[list[float]]]] = {}
    for p in scn.POLICIES:
        ids = {client_endpoint(p, scn.CENTRAL), client_endpoint(p, scn.EDGE)}
        mine = [r for r in client if r["endpoint_id"] in ids]
        policies[p] = {"all": _phase_stats(mine, phase)}
        p99_series[p], err_series[p] = {}, {}
        for region in (scn.CENTRAL, scn.EDGE):
            rr = [r for r in mine if r["endpoint_id"] == client_endpoint(p, region)]
            policies[p][region] = _phase_stats(rr, phase)
            p99_series[p][region] = [[round(r["t_ms"] / 1000 - facts["t_live"], 1),
                                      round(float(r["p99"]), 1)] for r in rr]
            err_series[p][region] = [[round(r["t_ms"] / 1000 - facts["t_live"], 1),
                                      int(r["errors"]), int(r["n"])] for r in rr]
    season = int(sc["season_s"])
    # One season before the live start too: the seasonal-naive baseline's values.
    actual = _q(dsn, {"sql": ACTUAL_SQL, "params": {"api": scn.API,
                                                    "since": since - season * 1000}})
    fc = _q(dsn, {"sql": FORECAST_SQL, "params": {"api": scn.API, "h": HORIZON,
                                                  "since": since, "until": until}})
    act_by: dict[str, dict[int, float]] = defaultdict(dict)
    for r in actual:
        act_by[r["endpoint_id"]][int(r["t_s"])] = float(r["n"])
    forecast: dict[str, list[list[float | None]]] = {}
    for ep in facts["capacities"]:
        pts = [r for r in fc if r["endpoint_id"] == ep]
        forecast[ep] = [[int(r["t_s"]) - facts["t_live"], act_by[ep].get(int(r["t_s"])),
                         round(float(r["mean"]), 2), round(float(r["lower"]), 2),
                         round(float(r["upper"]), 2)] for r in pts]
    accuracy = _q(dsn, {"query": "forecast-accuracy",
                        "params": {"since_ms": since, "until_ms": until, "api": scn.API}})
    weights_rows = _q(dsn, {"sql": WEIGHTS_SQL, "params": {"since": since}})
    weights: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    stale = 0
    for r in weights_rows:
        weights[r["sidecar_id"]][r["endpoint_id"]].append(
            [round(r["t_ms"] / 1000 - facts["t_live"], 2), round(float(r["weight"]), 4)])
        stale += bool(r["stale"])
    lead = _q(dsn, {"query": "mirror-lead-time",
                    "params": {"since_ms": int(facts["t0"] * 1000), "until_ms": until + 60_000,
                               "api": scn.API, "lookback_s": 60}})
    commands = _q(dsn, {"sql": COMMANDS_SQL})
    statuses = _q(dsn, {"sql": STATUS_SQL})
    # Mirror instances are not in the sidecar's telemetry: count what answered (X-Endpoint
    # headers the load generator saw) instead.
    share: dict[str, float] = {}
    for lane in scn.PREDICTIVE:
        seen = facts["client"][lane]["by_endpoint"]
        mirror_requests = sum(n for e, n in seen.items() if "@" in e)
        edge_requests = sum(n for e, n in seen.items() if "@" in e or f"-{scn.EDGE}-" in e)
        share[lane] = round(mirror_requests / edge_requests, 4) if edge_requests else 0.0
    edge_demand: dict[int, float] = defaultdict(float)
    for r in actual:
        if r["region"] == scn.EDGE and int(r["t_s"]) >= int(facts["t_live"]):
            edge_demand[int(r["t_s"]) - int(facts["t_live"])] += float(r["n"])
    # The last second's telemetry may be cut short by the stop: left out.
    fskill = forecast_skill(actual, fc, facts["capacities"], season, HORIZON,
                            int(facts["t_live"]), int(facts["t_end"]) - 1)
    return {
        "skill": fskill,
        "policies": policies, "p99": p99_series, "errors": err_series, "forecast": forecast,
        "accuracy": accuracy, "weights": {k: dict(v) for k, v in weights.items()},
        "stale_weight_rows": stale, "lead": lead, "commands": commands, "statuses": statuses,
        "mirror_share_of_edge": share["predictive"],
        "mirror_share_of_edge_by_lane": share,
        "edge_demand": sorted([t, n] for t, n in edge_demand.items()),
        "horizon": HORIZON, "scenario": sc,
    }


ERROR_TIE = 0.002  # error rates within 0.2 points of each other: no difference
GROUPS = {scn.CENTRAL: "central clients (routing only: same backends, no mirrors in any lane)",
          scn.EDGE: "edge clients (routing plus mirrors: only the two predictive lanes have "
                    "edge mirrors)"}
BASELINES = ("peak-ewma", "round-robin", "predictive-persistence")


def verdict(ratio: float | None, err: float | None, base_err: float | None) -> str:
    """``won``, ``lost`` or ``tie`` for one comparison: p99 ratio (subject / baseline)
    outside 1 ± :data:`TIE`, error rates more than :data:`ERROR_TIE` apart. Worse on
    either count is a loss; better on one and not worse on the other, a win.

    >>> verdict(0.9, 0.0, 0.0), verdict(0.9, 0.01, 0.0), verdict(1.01, 0.0, 0.05)
    ('won', 'lost', 'won')
    >>> verdict(1.01, 0.001, 0.0), verdict(None, None, None)
    ('tie', 'no data')
    """
    if ratio is None:
        return "no data"
    e, b = err or 0.0, base_err or 0.0
    lat = -1 if ratio < 1 - TIE else 1 if ratio > 1 + TIE else 0
    er = -1 if e < b - ERROR_TIE else 1 if e > b + ERROR_TIE else 0
    if lat > 0 or er > 0:
        return "lost"
    return "won" if lat < 0 or er < 0 else "tie"


def tone(verdicts: list[str]) -> str:
    """A headline line's colour: ``win`` only when nothing was lost and something won."""
    if "lost" in verdicts:
        return "lose"
    return "win" if "won" in verdicts else "neutral"


def headline(q: dict[str, Any], machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The comparison as claims, each with the numbers behind it, and the lines that say
    them: per client group what ``predictive`` won and lost against each baseline (the
    ablation ``predictive-persistence`` among them), then whether its forecasts earned
    their place, then the mirrors' lead times."""
    pol = q["policies"]
    out: dict[str, Any] = {"tolerance": {"p99_ratio": TIE, "error_rate": ERROR_TIE,
                                         "skill_target": SKILL_TARGET,
                                         "coverage_target": list(COVERAGE_TARGET)}}
    claims: list[dict[str, Any]] = []
    statements: list[dict[str, Any]] = []
    for base in ("round-robin", "peak-ewma"):  # all clients together, as before
        for ph in PHASES:
            out[f"p99_ratio_vs_{base}_{ph}"] = _ratio(pol["predictive"]["all"][ph]["p99_ms"],
                                                      pol[base]["all"][ph]["p99_ms"])
    for g, title in GROUPS.items():
        for base in BASELINES:
            ids, parts = [], []
            for ph in PHASES:
                a, b = pol["predictive"][g][ph], pol[base][g][ph]
                if not a["requests"] or not b["requests"]:
                    continue
                r = _ratio(a["p99_ms"], b["p99_ms"])
                c = {"id": f"{g}:predictive-vs-{base}:{ph}", "kind": "latency", "group": g,
                     "subject": "predictive", "baseline": base, "phase": ph,
                     "p99_ms": a["p99_ms"], "baseline_p99_ms": b["p99_ms"], "ratio": r,
                     "error_rate": a["error_rate"], "baseline_error_rate": b["error_rate"],
                     "verdict": verdict(r, a["error_rate"], b["error_rate"])}
                claims.append(c)
                ids.append(c["id"])
                parts.append(f"{ph} {c['verdict']} (p99 x{r:.2f}, errors "
                             f"{a['error_rate'] or 0:.2%} vs {b['error_rate'] or 0:.2%})"
                             if r is not None else f"{ph}: no data")
            vs = [c["verdict"] for c in claims if c["id"] in ids]
            what = ("the ablation: the forecast's own share" if base == "predictive-persistence"
                    else "reactive")
            statements.append({
                "group": g, "tone": tone(vs), "claims": ids,
                "text": f"{title}: predictive vs {base} ({what}): " + "; ".join(parts)})
    # Forecast skill at the planner's horizon, per client group.
    sk = q["skill"]
    for g, st in sk["groups"].items():
        ids, parts = [], []
        for base in ("seasonal_naive", "persistence"):
            m = st[f"mase_vs_{base}"]
            c = {"id": f"{g}:forecast-vs-{base}", "kind": "forecast", "series": "demand",
                 "group": g,
                 "baseline": base.replace("_", "-"), "horizon_s": sk["horizon_s"],
                 "mase": m, "mae": st["mae"], "baseline_mae": st[f"mae_{base}"],
                 "points": st["points"], "target": SKILL_TARGET,
                 "verdict": "no data" if m is None else "won" if m <= SKILL_TARGET
                 else "lost"}
            claims.append(c)
            ids.append(c["id"])
            parts.append(f"MASE {m} vs {c['baseline']} ({c['verdict']})" if m is not None
                         else f"no data vs {c['baseline']}")
        cov = st["coverage"]
        lo, hi = COVERAGE_TARGET
        c = {"id": f"{g}:forecast-band-coverage", "kind": "coverage", "group": g,
             "coverage": cov, "points": st["points"], "target": [lo, hi],
             "verdict": "no data" if cov is None else "won" if lo <= cov <= hi else "lost"}
        claims.append(c)
        ids.append(c["id"])
        parts.append(f"90 % band coverage {cov} ({c['verdict']})")
        statements.append({
            "group": g, "tone": tone([c["verdict"] for c in claims if c["id"] in ids]),
            "claims": ids,
            "text": f"{g} demand forecast {sk['horizon_s']} s ahead (the horizon the planner "
                    f"and the mirror director act on), over {st['points']} s: "
                    + "; ".join(parts)})
    for g, st in sk["planner_sums"].items():
        if not st["mirrors"]:
            continue  # no mirror: the planner's sum is the forecast above
        ids = []
        for base in ("seasonal_naive", "persistence"):
            m = st[f"mase_vs_{base}"]
            c = {"id": f"{g}:planner-sum-vs-{base}", "kind": "forecast", "series": "planner",
                 "group": g, "baseline": base.replace("_", "-"), "horizon_s": sk["horizon_s"],
                 "mase": m, "mae": st["mae"], "baseline_mae": st[f"mae_{base}"],
                 "points": st["points"], "target": SKILL_TARGET,
                 "verdict": "no data" if m is None else "won" if m <= SKILL_TARGET
                 else "lost"}
            claims.append(c)
            ids.append(c["id"])
        statements.append({
            "group": g, "tone": tone([c["verdict"] for c in claims if c["id"] in ids]),
            "claims": ids,
            "text": f"{g} demand as the planner adds it up (plus what the "
                    f"{len(st['mirrors'])} mirror(s) carried when the forecast was made): "
                    f"MASE {st['mase_vs_seasonal_naive']} vs seasonal-naive, MASE "
                    f"{st['mase_vs_persistence']} vs persistence"})
    leads = [r["lead_seconds"] for r in q["lead"] if r.get("lead_seconds") is not None]
    out["mirror_activations"] = len(q["lead"])
    out["mirror_lead_seconds"] = leads
    # No crossing (NULL lead): demand never went over capacity, said as such, not a number.
    out["mirror_no_crossing"] = len(q["lead"]) - len(leads)
    ahead = sum(1 for x in leads if x > 0)
    c = {"id": "edge:mirror-lead", "kind": "mirror", "group": scn.EDGE,
         "activations": len(q["lead"]), "ready_before": ahead,
         "ready_after": len(leads) - ahead, "no_crossing": out["mirror_no_crossing"],
         "lead_seconds": leads,
         "verdict": "no data" if not leads else "won" if ahead == len(leads) else "lost"}
    claims.append(c)
    if q["lead"]:
        shown = ", ".join("no crossing" if r.get("lead_seconds") is None
                          else f"{r['lead_seconds']:+.1f}s" for r in q["lead"])
        text = (f"{len(q['lead'])} edge mirror activation(s) in the predictive lane: ready "
                f"before the edge demand crossed central capacity in {ahead}, after it in "
                f"{len(leads) - ahead}, no crossing in {out['mirror_no_crossing']} "
                f"(lead {shown})")
    else:
        text = "no edge mirror was activated in the predictive lane"
    statements.append({"group": scn.EDGE, "tone": tone([c["verdict"]]), "claims": [c["id"]],
                       "text": text})
    if machine:
        per_cpu = max(machine["load_1m_at_live_start"], machine["load_1m_at_live_end"]) / max(
            1, machine["cpus"])
        busy = per_cpu > BUSY_LOAD_PER_CPU
        c = {"id": "machine-load", "kind": "machine", "group": "all", **machine,
             "load_per_cpu": round(per_cpu, 2), "limit": BUSY_LOAD_PER_CPU,
             "verdict": "lost" if busy else "tie"}
        claims.append(c)
        statements.insert(0, {
            "group": "all", "tone": "lose" if busy else "neutral", "claims": [c["id"]],
            "text": (f"machine load during the live run: {per_cpu:.2f} runnable processes per "
                     f"CPU ({machine['cpus']} CPUs)"
                     + (": the lanes' latencies measure CPU contention more than the "
                        "policies; rerun on an idle machine before trusting the p99 lines"
                        if busy else ": the lanes were not starved of CPU"))})
    # Prediction won only where none of its claims lost (the machine's load is context).
    out["predictive_wins"] = not any(c["verdict"] == "lost" for c in claims
                                     if c["kind"] != "machine")
    out["claims"] = claims
    out["statements"] = statements
    return out


# ------------------------------------------------------------------------- charts


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _shade(ax: Any, facts: dict[str, Any], legend: bool = False) -> None:
    t = facts["t_live"]
    d0, d1 = facts["degrade_window"]
    ax.axvspan(d0 - t, d1 - t, color="orange", alpha=0.15,
               label="central backend degraded" if legend else None)
    for i, (a, b) in enumerate(facts["spike_windows"]):
        ax.axvspan(a - t, b - t, color="red", alpha=0.10,
                   label="edge spike" if legend and i == 0 else None)


def _rolling(xs: list[float], n: int = 5) -> list[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        if len(acc) > n:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def charts(facts: dict[str, Any], q: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    out = {}
    # p99 and errors per lane and region
    fig, axes = plt.subplots(2, 2, figsize=(13, 7), sharex=True)
    for col, region in enumerate((scn.CENTRAL, scn.EDGE)):
        ax, ax2 = axes[0][col], axes[1][col]
        for p in scn.POLICIES:
            s = q["p99"][p][region]
            if s:
                ax.plot([x[0] for x in s], _rolling([x[1] for x in s]), color=COLORS[p],
                        label=p, lw=1.6)
            e = q["errors"][p][region]
            if e:
                ax2.plot([x[0] for x in e], _rolling([100 * x[1] / x[2] if x[2] else 0
                                                      for x in e]), color=COLORS[p], label=p)
        _shade(ax, facts, legend=col == 0)
        _shade(ax2, facts)
        ax.set_title(f"{region} clients: p99 latency (5 s rolling)")
        ax.set_ylabel("p99 ms")
        ax.set_yscale("log")
        ax2.set_title(f"{region} clients: errors (5 s rolling)")
        ax2.set_ylabel("% of requests")
        ax2.set_xlabel("seconds since live start")
    # Above the charts, not over the lines.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out["latency"] = _png(fig)
    # forecast vs actual
    eps = list(q["forecast"])
    fig, axes = plt.subplots(len(eps), 1, figsize=(13, 2.3 * len(eps)), sharex=True,
                             squeeze=False)
    for ax, ep in zip(axes[:, 0], eps, strict=True):
        pts = q["forecast"][ep]
        if pts:
            xs = [p[0] for p in pts]
            ax.fill_between(xs, [p[3] for p in pts], [p[4] for p in pts], color="#1f77b4",
                            alpha=0.2, label="90 % band")
            ax.plot(xs, [p[2] for p in pts], color="#1f77b4", lw=1.4,
                    label=f"forecast made {q['horizon']} s before")
            ax.plot([p[0] for p in pts if p[1] is not None],
                    [p[1] for p in pts if p[1] is not None], color="black", lw=1.0,
                    label="actual")
        ax.axhline(facts["capacities"][ep], color="gray", ls="--", lw=1, label="capacity")
        _shade(ax, facts)
        ax.set_title(ep, loc="left", fontsize=10)
        ax.set_ylabel("req/s")
    axes[0, 0].legend(loc="upper left", ncol=4, fontsize=8)
    axes[-1, 0].set_xlabel("seconds since live start")
    fig.tight_layout()
    out["forecast"] = _png(fig)
    # weights
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.6), sharey=True)
    for ax, sid in zip(axes, ("predictive-central", "predictive-edge"), strict=True):
        for ep, pts in sorted(q["weights"].get(sid, {}).items()):
            if "@" in ep:
                continue
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", label=ep)
        _shade(ax, facts)
        ax.set_title(f"{sid} sidecar: routing weights")
        ax.set_xlabel("seconds since live start")
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel("weight")
    fig.tight_layout()
    out["weights"] = _png(fig)
    # edge demand and mirrors
    fig, ax = plt.subplots(figsize=(13, 3.4))
    d = q["edge_demand"]
    ax.plot([x[0] for x in d], [x[1] for x in d], color="black", lw=1.2,
            label="edge demand, predictive lane (req/s)")
    ax.axhline(facts["edge_capacity_rps"], color="gray", ls="--", lw=1,
               label="edge region's central capacity")
    t = facts["t_live"]
    ready = {s["command_id"]: s["t_ms"] / 1000 - t for s in q["statuses"]
             if s["state"] == "READY"}
    # DRAINING/RETIRED carry the RETIRE command's id, not the activation's: a ready span
    # ends at the first of them after it (the demo has one edge region).
    gone = sorted(s["t_ms"] / 1000 - t for s in q["statuses"]
                  if s["state"] in ("DRAINING", "RETIRED"))
    first = True
    for a in ready.values():
        b = min([g for g in gone if g > a] + [facts["t_end"] - t])
        ax.axvspan(a, b, color="green", alpha=0.15, label="mirror ready" if first else None)
        first = False
    for c in q["commands"]:
        ax.axvline(c["t_ms"] / 1000 - t, color="green" if c["action"] == "ACTIVATE" else
                   "purple", lw=1, ls=":")
    crossed = [datetime.fromisoformat(r["crossed_at"]).timestamp() - t for r in q["lead"]
               if r.get("crossed_at")]
    if crossed:
        ax.plot(crossed, [facts["edge_capacity_rps"]] * len(crossed), "rv", ms=8,
                label="demand crossed capacity (mirror-lead-time)")
    _shade(ax, facts)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since live start (dotted: ACTIVATE green, RETIRE purple)")
    ax.set_ylabel("req/s")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("edge region: demand, capacity and mirror activations")
    fig.tight_layout()
    out["mirrors"] = _png(fig)
    return out


# ------------------------------------------------------------------------- html

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid
#ddd}table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left;white-space:nowrap}
img{max-width:100%;border:1px solid #eee}.win{color:#1a7f37}.lose{color:#b42318}
.note{color:#555;font-size:.92em}ul.head li{margin:.25em 0;font-size:1.05em}"""


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('-' if v is None else str(v))}</td>"
                                    for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def render_html(summary: dict[str, Any], imgs: dict[str, str]) -> str:
    """The self-contained report page."""
    s, hl = summary, summary["headline"]
    sc = s["scenario"]
    head = "".join(f"<li class='{x['tone']}'>{html.escape(x['text'])}</li>"
                   for x in hl["statements"])
    rows = []
    for p in scn.POLICIES:
        for region in ("all", scn.CENTRAL, scn.EDGE):
            st = s["policies"][p][region]
            rows.append([p, region, st["overall"]["requests"],
                         *(st[ph]["p99_ms"] for ph in PHASES),
                         *(f"{(st[ph]['error_rate'] or 0):.2%}" for ph in PHASES)])
    pol_table = _table(["lane", "clients", "requests", *(f"p99 ms {ph}" for ph in PHASES),
                        *(f"errors {ph}" for ph in PHASES)], rows)
    acc = _table(["endpoint", "horizon s", "points", "MAE", "MASE", "90% coverage"],
                 [[r["endpoint_id"], r["horizon"], r["points"], r["mae"], r["mase"],
                   r["coverage"]] for r in s["forecast_accuracy"]
                  if r["horizon"] in (1, 5, 15)])
    lead = _table(["command", "ready at", "demand crossed", "lead s", "demand rps",
                   "capacity rps", "note"],
                  [[r["command_id"], r["ready_at"], r["crossed_at"], r["lead_seconds"],
                    r.get("demand_rps"), r.get("capacity_rps"), r.get("note")]
                   for r in s["mirrors"]["activations"]])
    sk = s["forecast_skill"]
    skill_tab = _table(["series", "points", "MAE", "MAE seasonal-naive", "MAE persistence",
                        "MASE vs seasonal-naive", "MASE vs persistence", "90% coverage"],
                       [[name, r["points"], r["mae"], r["mae_seasonal_naive"],
                         r["mae_persistence"], r["mase_vs_seasonal_naive"],
                         r["mase_vs_persistence"], r["coverage"]]
                        for name, r in [*((f"{g} demand", v) for g, v in sk["groups"].items()),
                                        *((f"{g} demand, planner's sum (+ mirrors' "
                                           "current rate)", v)
                                          for g, v in sk["planner_sums"].items()
                                          if v["mirrors"]),
                                        *sk["endpoints"].items()]])
    mode = "quick" if sc.get("quick") else "full"
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>loadcast demo report</title><style>{CSS}</style></head><body>
<h1>loadcast demo report</h1>
<p class="note">{mode} run, {s['live_seconds']} s of live traffic ({s['duration_s']:.0f} s in
all), {s['arrivals']:,} arrivals sent to each of four policy lanes side by side on identical
simulated backends: <b>predictive</b> (the whole pipeline), <b>predictive-persistence</b>
(the ablation: the same pipeline, its own worker, planner and mirrors, with the forecaster
replaced by persistence, so what predictive gains over it is the forecast's), and the
reactive <b>round-robin</b> and <b>peak-ewma</b>.
Trace shape: {html.escape(Path(s['trace']).name)}, one day compressed into
{sc['season_s']} s. Numbers from ClickHouse queries over what the pipeline stored.</p>
<h2>Headline</h2>
<p class="note">Green: predictive won and lost nothing in that comparison; red: it lost
somewhere (p99 more than {TIE:.0%} higher or errors more than {ERROR_TIE:.1%} higher); no
colour: within noise. Forecasts earn their place at MASE &le; {SKILL_TARGET} against both
naive forecasts with 90 % bands covering {COVERAGE_TARGET[0]:.0%}-{COVERAGE_TARGET[1]:.0%}.
Every line's numbers are claims in summary.json.</p>
<ul class="head">{head}</ul>
<h2>Latency and errors by policy</h2>
<p class="note">Client-side, per lane: p99 is the request-weighted mean of per-second window
p99s. Phases: <b>degraded</b> = one central backend {sc['degrade'][2]:g}x slower,
<b>spike</b> = edge demand x{sc['spike'][2]:g} (shaded red), <b>steady</b> = the rest.
The predictive lane also has edge mirrors; the baselines are reactive proxies without
Kafka, so on the edge the comparison is prediction + mirroring against reaction alone;
the central columns compare routing policies only.</p>
{pol_table}
<img src="data:image/png;base64,{imgs['latency']}" alt="p99 and errors over time">
<h2>Forecast vs actual (predictive lane, {s['horizon']} s ahead)</h2>
<img src="data:image/png;base64,{imgs['forecast']}" alt="forecast vs actual">
<p class="note">Forecast skill {s['horizon']} s ahead against the two naive forecasts at
the same horizon on the same seconds (MASE = the forecast's mean absolute error / the
naive one's; below 1 = better). Per client group: the region's demand (its endpoints' and
mirrors' requests) against the sum of its endpoints' forecasts, what the planner adds up;
per endpoint: that endpoint's requests, which the routing itself shifts.</p>{skill_tab}
<p class="note">forecast-accuracy query (live range), horizons 1, 5, 15 s (its MASE scales by
the one-step-back naive error, so at 5 and 15 s it is above 1 even for a good forecast):</p>
{acc}
<h2>Routing weights over time</h2>
<img src="data:image/png;base64,{imgs['weights']}" alt="weights over time">
<h2>Edge mirrors</h2>
<p class="note">mirror-lead-time query: lead = when the edge region's demand crossed central
capacity minus when the mirror was ready (positive = ready before). Demand is the sum of the
latest scores' current rates over the region's endpoints, the mirror's included; capacity is
the one the planner's command compared against. The crossing is the start of the
over-capacity run the command met (looked for up to 60 s back), else the next one before the
following command; it is the time a score first showed it, about one second after the
requests (the chart's demand is per telemetry second). No crossing: no lead. Share of the
predictive edge's requests answered by a mirror (load generator's count):
{s['mirrors']['share_of_edge_requests']:.1%}.</p>{lead}
<img src="data:image/png;base64,{imgs['mirrors']}" alt="edge demand and mirrors">
<p class="note">Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by <code>loadcast demo</code>;
processes left behind: {s['leftover_processes']}.</p>
</body></html>"""


def build_report(facts: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Query, summarise, draw; write ``summary.json`` and ``report.html``."""
    q = query_facts(facts)
    hl = headline(q, facts.get("machine"))
    summary: dict[str, Any] = {
        "version": 1,
        "quick": bool(facts["scenario"].get("quick")),
        "live_seconds": facts["scenario"]["live_seconds"],
        "duration_s": round(time.time() - facts["started"], 1),
        "trace": facts["trace"],
        "comparison": "four policy lanes side by side on identical backends, same arrivals",
        "forecast_skill": q["skill"],
        "scenario": facts["scenario"],
        "arrivals": facts["arrivals"],
        "machine": facts.get("machine"),
        "load_generator": facts["client"],
        "policies": q["policies"],
        "headline": hl,
        "series": {"p99_ms": q["p99"], "errors": q["errors"], "weights": q["weights"],
                   "forecast": q["forecast"], "edge_demand": q["edge_demand"]},
        "horizon": q["horizon"],
        "forecast_accuracy": q["accuracy"],
        "mirrors": {"activations": q["lead"], "commands": q["commands"],
                    "statuses": q["statuses"],
                    "share_of_edge_requests": q["mirror_share_of_edge"],
                    "share_of_edge_requests_by_lane": q["mirror_share_of_edge_by_lane"]},
        "leftover_processes": facts.get("leftover_processes", 0),
        "scores_seen": facts["scores_seen"],
        "scores_seen_by_lane": facts.get("scores_seen_by_lane", {}),
    }
    imgs = charts(facts, q)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str,
                                                     allow_nan=False) + "\n")
    (out_dir / "report.html").write_text(render_html(summary, imgs))
    return summary

