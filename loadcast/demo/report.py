"""The demo's report: ``summary.json`` and a self-contained ``report.html`` (charts as
base64 PNGs), drawn from the facts of the run and what :mod:`loadcast.demo.measures`
queries from ClickHouse; the claims from :mod:`loadcast.demo.headline`, the charts from
:mod:`loadcast.demo.charts`. To draw it again: ``build_report(facts, out_dir)`` with the
run's ``work/facts.json``.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from loadcast.demo import scenario as scn
from loadcast.demo.charts import charts
from loadcast.demo.headline import COVERAGE_TARGET, ERROR_TIE, SKILL_TARGET, TIE, headline
from loadcast.demo.measures import PHASES, query_facts

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



def _tables(s: dict[str, Any]) -> dict[str, str]:
    """The report's tables: by policy, forecast skill, forecast accuracy, mirror leads."""
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
                        for name, r in _skill_rows(sk)])
    return {"policies": pol_table, "accuracy": acc, "lead": lead, "skill": skill_tab}


def _skill_rows(sk: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The forecast-skill table's rows: what the planner acts on per group first."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for g, v in sk["groups"].items():
        rows.append((f"{g} demand: {v.get('source', 'sum')} vs {v.get('actual', 'requests')}",
                     v))
        if "vs_served" in v:
            rows.append((f"{g} demand: {v['source']} vs served requests (endpoints + "
                         "mirrors, counted when answered)", v["vs_served"]))
    for g, v in sk["planner_sums"].items():
        if v["mirrors"]:
            used = "" if v.get("planner_uses", True) else ", not used: the demand series is"
            rows.append((f"{g} demand, endpoints' sum + mirrors' current rate{used}", v))
    return [*rows, *sk["endpoints"].items()]


def render_html(summary: dict[str, Any], imgs: dict[str, str]) -> str:
    """The self-contained report page."""
    s, hl = summary, summary["headline"]
    sc = s["scenario"]
    head = "".join(f"<li class='{x['tone']}'>{html.escape(x['text'])}</li>"
                   for x in hl["statements"])
    t = _tables(s)
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
somewhere (p99 more than {TIE:.0%} higher or errors more than {ERROR_TIE:.1%} higher, and
the 95 % interval in brackets, a paired bootstrap over the phase's seconds, leaves out no
difference); no colour: within noise. Forecasts earn their place at MASE &le;
{SKILL_TARGET} against both naive forecasts with 90 % bands covering
{COVERAGE_TARGET[0]:.0%}-{COVERAGE_TARGET[1]:.0%}.
Every line's numbers are claims in summary.json.</p>
<ul class="head">{head}</ul>
<h2>Latency and errors by policy</h2>
<p class="note">Client-side, per lane: p99 is the request-weighted mean of per-second window
p99s. Phases: <b>degraded</b> = one central backend {sc['degrade'][2]:g}x slower,
<b>spike</b> = edge demand x{sc['spike'][2]:g} (shaded red), <b>steady</b> = the rest.
The predictive lane also has edge mirrors; the baselines are reactive proxies without
Kafka, so on the edge the comparison is prediction + mirroring against reaction alone;
the central columns compare routing policies only.</p>
{t["policies"]}
<img src="data:image/png;base64,{imgs['latency']}" alt="p99 and errors over time">
<h2>Forecast vs actual (predictive lane, {s['horizon']} s ahead)</h2>
<img src="data:image/png;base64,{imgs['forecast']}" alt="forecast vs actual">
<p class="note">Forecast skill {s['horizon']} s ahead against the two naive forecasts at
the same horizon on the same seconds (MASE = the forecast's mean absolute error / the
naive one's; below 1 = better). Per client group, what the planner acts on: at the edge,
the forecast of the region's demand series (the edge sidecar counts every request of its
region on it, before choosing an endpoint or a mirror) against those counts, the region's
arrivals, and also against the requests its endpoints and mirrors answered (counted when
answered: under CPU contention they lag the arrivals); in the central region the sum of
its endpoints' forecasts against their requests. Then the sum the planner made before the
edge had a demand series (the endpoints' forecasts plus the mirrors' current rate) and
per endpoint: that endpoint's requests, which the routing itself shifts (at the edge, a
mirror takes the spikes away from them).</p>{t["skill"]}
<p class="note">forecast-accuracy query (live range), horizons 1, 5, 15 s (its MASE scales by
the one-step-back naive error, so at 5 and 15 s it is above 1 even for a good forecast):</p>
{t["accuracy"]}
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
{s['mirrors']['share_of_edge_requests']:.1%}.</p>{t["lead"]}
<img src="data:image/png;base64,{imgs['mirrors']}" alt="edge demand and mirrors">
<p class="note">Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by <code>loadcast demo</code>;
processes left behind: {s['leftover_processes']}; {_restarts(s['restarts'])}.</p>
</body></html>"""




def _restarts(restarts: list[dict[str, Any]]) -> str:
    """The parts that died and were started again, for the report's footer."""
    if not restarts:
        return "no part restarted"
    return "<b>restarted</b>: " + ", ".join(
        f"{html.escape(r['part'])} (exit {r['exit_code']}, see "
        f"<code>{html.escape(r['log'])}</code>)" for r in restarts)


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
        "phases": q["phase_windows"],  # seconds since the live start, as the series
        "horizon": q["horizon"],
        "forecast_accuracy": q["accuracy"],
        "mirrors": {"activations": q["lead"], "commands": q["commands"],
                    "statuses": q["statuses"],
                    "share_of_edge_requests": q["mirror_share_of_edge"],
                    "share_of_edge_requests_by_lane": q["mirror_share_of_edge_by_lane"]},
        "leftover_processes": facts.get("leftover_processes", 0),
        "restarts": facts.get("restarts", []),
        "scores_seen": facts["scores_seen"],
        "scores_seen_by_lane": facts.get("scores_seen_by_lane", {}),
    }
    imgs = charts(facts, q)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str,
                                                     allow_nan=False) + "\n")
    (out_dir / "report.html").write_text(render_html(summary, imgs))
    return summary

