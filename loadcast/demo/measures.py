"""The demo's measurements, from ClickHouse: every number the report shows comes from the
sink's tables (queried directly on the chDB directory once the sink has stopped): the
lanes' client-side latency and errors from the ``telemetry`` the load generator's edge
agents published, forecasts from ``forecast_points``, weights from ``routing_decisions``,
mirrors from the ``mirror-lead-time`` canned query and ``mirror_commands``. Per-phase p99
is the request-weighted mean of the per-second window p99s (as the canned ``latency``
query does per minute). :func:`skill` and :func:`forecast_skill` score the forecasts
against the naive ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from loadcast.demo import scenario as scn
from loadcast.demo.loadgen import client_endpoint
from processors.mirroring import demand_series_id
from sinks.service import query
from sinks.settings import SinkSettings

HORIZON = 5  # the forecast horizon drawn against the actuals (steps = seconds)
PHASES = ("overall", "steady", "degraded", "spike")


def _q(dsn: str, body: dict[str, Any]) -> list[dict[str, Any]]:
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

    ``groups``: the forecast the planner acts on, against the demand it forecasts. For a
    region with a demand series (the edge sidecar counts every request of its region on
    ``{api}-demand-{region}``, before choosing an endpoint or mirror; the planner and the
    mirror director take that series' forecast as the region's demand) that is the
    series' forecast against the series' own counts, the region's arrivals (``source``,
    ``actual`` say so); ``vs_served`` scores the same forecast against the requests the
    region's endpoints and mirrors answered (counted when answered, so late under load).
    For a region without one: the sum of its regular endpoints' forecasts (mean and band)
    against the requests of all its endpoints and mirrors. ``planner_sums``: the sum the
    planner makes without a demand series (``processors.mirroring.DemandTable``), the
    endpoints' forecasts plus each mirror's rate when the forecast was made, held flat;
    ``planner_uses`` is False where a demand series replaced it.
    """
    series_of = {g: demand_series_id(scn.API, g) for g in (scn.CENTRAL, scn.EDGE)}
    region_of = {str(r["endpoint_id"]): str(r["region"]) for r in actual}
    by_ep: dict[str, dict[int, float]] = defaultdict(dict)
    group: dict[str, dict[int, float]] = {g: defaultdict(float) for g in (scn.CENTRAL, scn.EDGE)}
    for r in actual:
        t = int(r["t_s"])
        by_ep[r["endpoint_id"]][t] = float(r["n"])
        # the demand series counts the same requests again: not in the served sum
        if r["region"] in group and r["endpoint_id"] not in series_of.values():
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
        mirrors = [e for e in fc_ep if e not in capacities and region_of.get(e) == g
                   and e != series_of[g]]
        series = fc_ep.get(series_of[g])
        for key, ms in (("groups", []), ("planner_sums", mirrors)):
            summed = {t: tuple(sum(fc_ep[e][t][i] for e in eps) +
                               sum(by_ep[m].get(t - h, 0.0) for m in ms)
                               for i in range(3)) for t in common}
            out[key][g] = {"source": "sum of endpoint forecasts", "actual": "served requests",
                           "endpoints": eps, "mirrors": ms, "planner_uses": not series,
                           **skill(dict(group[g]), summed, season, h)}  # type: ignore[arg-type]
        if series:  # what the planner acts on: the region's own demand forecast
            out["groups"][g] = {
                "source": series_of[g], "actual": "arrivals (the demand series' counts)",
                "endpoints": eps, "mirrors": mirrors, "planner_uses": True,
                **skill(by_ep.get(series_of[g], {}), series, season, h),
                "vs_served": skill(dict(group[g]), series, season, h)}
    for e in capacities:
        out["endpoints"][e] = skill(by_ep.get(e, {}), fc_ep.get(e, {}), season, h)
    return out



def query_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows, from ClickHouse."""
    dsn = f"chdb://{facts['chdb']}"
    since = int(facts["t_live"] * 1000)
    until = int(facts["t_end"] * 1000) + 1
    sc = facts["scenario"]
    season = int(sc["season_s"])
    client = _q(dsn, {"sql": CLIENT_SQL, "params": {"api": scn.CLIENT_API, "since": since}})
    policies, p99_series, err_series = _client_stats(client, _phases(facts), facts["t_live"])
    # One season before the live start too: the seasonal-naive baseline's values.
    actual = _q(dsn, {"sql": ACTUAL_SQL, "params": {"api": scn.API,
                                                    "since": since - season * 1000}})
    fc = _q(dsn, {"sql": FORECAST_SQL, "params": {"api": scn.API, "h": HORIZON,
                                                  "since": since, "until": until}})
    accuracy = _q(dsn, {"query": "forecast-accuracy",
                        "params": {"since_ms": since, "until_ms": until, "api": scn.API}})
    weights, stale = _weights(_q(dsn, {"sql": WEIGHTS_SQL, "params": {"since": since}}),
                              facts["t_live"])
    lead = _q(dsn, {"query": "mirror-lead-time",
                    "params": {"since_ms": int(facts["t0"] * 1000), "until_ms": until + 60_000,
                               "api": scn.API, "lookback_s": 60}})
    share = _mirror_share(facts)
    edge_demand: dict[int, float] = defaultdict(float)
    series = demand_series_id(scn.API, scn.EDGE)  # counts the same requests again
    for r in actual:
        if r["region"] == scn.EDGE and int(r["t_s"]) >= int(facts["t_live"]) \
                and r["endpoint_id"] != series:
            edge_demand[int(r["t_s"]) - int(facts["t_live"])] += float(r["n"])
    # The last second's telemetry may be cut short by the stop: left out.
    fskill = forecast_skill(actual, fc, facts["capacities"], season, HORIZON,
                            int(facts["t_live"]), int(facts["t_end"]) - 1)
    return {
        "skill": fskill,
        "policies": policies, "p99": p99_series, "errors": err_series,
        "forecast": _forecast_series(actual, fc, facts),
        "accuracy": accuracy, "weights": weights,
        "stale_weight_rows": stale, "lead": lead, "commands": _q(dsn, {"sql": COMMANDS_SQL}),
        "statuses": _q(dsn, {"sql": STATUS_SQL}),
        "mirror_share_of_edge": share["predictive"],
        "mirror_share_of_edge_by_lane": share,
        "edge_demand": sorted([t, n] for t, n in edge_demand.items()),
        "horizon": HORIZON, "scenario": sc,
        "phase_windows": phase_windows(facts),
    }


def phase_windows(facts: dict[str, Any]) -> dict[str, list[list[float]]]:
    """The degraded and spike windows in seconds since the live start (the series' time)."""
    t = facts["t_live"]
    d0, d1 = facts["degrade_window"]
    return {"degraded": [[round(d0 - t, 1), round(d1 - t, 1)]],
            "spike": [[round(a - t, 1), round(b - t, 1)] for a, b in facts["spike_windows"]]}


def _phases(facts: dict[str, Any]) -> Callable[[float], str]:
    """The phase of an epoch second: degraded, spike or steady."""
    d0, d1 = facts["degrade_window"]
    spikes = [tuple(w) for w in facts["spike_windows"]]

    def phase(t: float) -> str:
        if d0 <= t < d1:
            return "degraded"
        if any(a <= t < b for a, b in spikes):
            return "spike"
        return "steady"

    return phase


def _client_stats(client: list[dict[str, Any]], phase: Callable[[float], str],
                  t_live: float) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Per lane (all clients and per region) the phase statistics, and the p99 and error
    series since the live start."""
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
            p99_series[p][region] = [[round(r["t_ms"] / 1000 - t_live, 1),
                                      round(float(r["p99"]), 1)] for r in rr]
            err_series[p][region] = [[round(r["t_ms"] / 1000 - t_live, 1),
                                      int(r["errors"]), int(r["n"])] for r in rr]
    return policies, p99_series, err_series


def _forecast_series(actual: list[dict[str, Any]], fc: list[dict[str, Any]],
                     facts: dict[str, Any]) -> dict[str, list[list[float | None]]]:
    """Per regular endpoint: [t since live start, actual, mean, lower, upper]."""
    act_by: dict[str, dict[int, float]] = defaultdict(dict)
    for r in actual:
        act_by[r["endpoint_id"]][int(r["t_s"])] = float(r["n"])
    forecast: dict[str, list[list[float | None]]] = {}
    for ep in facts["capacities"]:
        pts = [r for r in fc if r["endpoint_id"] == ep]
        forecast[ep] = [[int(r["t_s"]) - facts["t_live"], act_by[ep].get(int(r["t_s"])),
                         round(float(r["mean"]), 2), round(float(r["lower"]), 2),
                         round(float(r["upper"]), 2)] for r in pts]
    return forecast


def _weights(rows: list[dict[str, Any]], t_live: float) -> tuple[dict[str, Any], int]:
    """Per sidecar and endpoint the weight steps since the live start; stale rows."""
    weights: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    stale = 0
    for r in rows:
        weights[r["sidecar_id"]][r["endpoint_id"]].append(
            [round(r["t_ms"] / 1000 - t_live, 2), round(float(r["weight"]), 4)])
        stale += bool(r["stale"])
    return {k: dict(v) for k, v in weights.items()}, stale


def _mirror_share(facts: dict[str, Any]) -> dict[str, float]:
    """Per predictive lane, the share of its edge requests a mirror answered."""
    # Mirror instances are not in the sidecar's telemetry: count what answered (X-Endpoint
    # headers the load generator saw) instead.
    share: dict[str, float] = {}
    for lane in scn.PREDICTIVE:
        seen = facts["client"][lane]["by_endpoint"]
        mirror_requests = sum(n for e, n in seen.items() if "@" in e)
        edge_requests = sum(n for e, n in seen.items() if "@" in e or f"-{scn.EDGE}-" in e)
        share[lane] = round(mirror_requests / edge_requests, 4) if edge_requests else 0.0
    return share
