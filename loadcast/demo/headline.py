"""The demo's headline: the comparison as claims, each with the numbers behind it, and
the lines that say them (green: predictive won and lost nothing in that comparison; red:
it lost somewhere; no colour: within noise).

One run's phase has 10-200 seconds of traffic, so a lane's p99 there moves by several
per cent between runs: a latency or error difference counts only when it is past a fixed
tolerance *and* its 95 % interval (a paired bootstrap over the phase's seconds, which both
lanes saw with the same arrivals) leaves out no difference."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from loadcast.demo import scenario as scn
from loadcast.demo.measures import PHASES

#: A ratio within this much of 1 is a tie ("no worse, within noise"), not a win or a loss.
TIE = 0.02
#: Bootstrap resamples for a claim's 95 % interval (seeded: a summary gives one answer).
RESAMPLES = 2000
MIN_WINDOWS = 5  # fewer seconds in a phase: no interval, so no win or loss either
#: The forecast earns its place when its MAE is at most this share of each baseline's.
SKILL_TARGET = 0.85
COVERAGE_TARGET = (0.85, 0.95)
#: Runnable processes per CPU (1-min load average) above which the latency lines are
#: flagged: the simulated backends, sidecars and load generator all share the CPUs.
BUSY_LOAD_PER_CPU = 1.5

ERROR_TIE = 0.002  # error rates within 0.2 points of each other: no difference
GROUPS = {scn.CENTRAL: "central clients (routing only: same backends, no mirrors in any lane)",
          scn.EDGE: "edge clients (routing plus mirrors: only the two predictive lanes have "
                    "edge mirrors)"}
BASELINES = ("peak-ewma", "round-robin", "predictive-persistence")


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def verdict(ratio: float | None, err: float | None, base_err: float | None,
            ratio_ci: Sequence[float] | None = None,
            err_diff_ci: Sequence[float] | None = None) -> str:
    """``won``, ``lost`` or ``tie`` for one comparison: p99 ratio (subject / baseline)
    outside 1 ± :data:`TIE` with its 95 % interval ``ratio_ci`` leaving out 1, error
    rates more than :data:`ERROR_TIE` apart with the interval of their difference
    ``err_diff_ci`` leaving out 0 (no interval given: the tolerances alone). Worse on
    either count is a loss; better on one and not worse on the other, a win.

    >>> verdict(0.9, 0.0, 0.0), verdict(0.9, 0.01, 0.0), verdict(1.01, 0.0, 0.05)
    ('won', 'lost', 'won')
    >>> verdict(1.01, 0.001, 0.0), verdict(None, None, None)
    ('tie', 'no data')
    >>> verdict(1.06, 0.0, 0.0, (0.98, 1.15)), verdict(1.06, 0.0, 0.0, (1.01, 1.12))
    ('tie', 'lost')
    """
    if ratio is None:
        return "no data"
    e, b = err or 0.0, base_err or 0.0
    r_lo, r_hi = ratio_ci if ratio_ci is not None else (ratio, ratio)
    d_lo, d_hi = err_diff_ci if err_diff_ci is not None else (e - b, e - b)
    lat = -1 if ratio < 1 - TIE and r_hi < 1 else 1 if ratio > 1 + TIE and r_lo > 1 else 0
    er = (-1 if e < b - ERROR_TIE and d_hi < 0 else
          1 if e > b + ERROR_TIE and d_lo > 0 else 0)
    if lat > 0 or er > 0:
        return "lost"
    return "won" if lat < 0 or er < 0 else "tie"


def phase_at(t: float, windows: Mapping[str, Sequence[Sequence[float]]]) -> str:
    """The phase of second ``t`` (since the live start) given the degraded and spike
    ``windows`` ([start, end) in the same seconds); the slow-down wins a tie, as in
    :func:`loadcast.demo.scenario.phase_of`.

    >>> w = {"degraded": [[10, 20]], "spike": [[15, 25]]}
    >>> phase_at(12, w), phase_at(22, w), phase_at(30, w)
    ('degraded', 'spike', 'steady')
    """
    for ph in ("degraded", "spike"):
        if any(a <= t < b for a, b in windows.get(ph, ())):
            return ph
    return "steady"


def intervals(series: Mapping[str, Any], subject: str, baseline: str, group: str,
              phase: str, windows: Mapping[str, Sequence[Sequence[float]]],
              resamples: int = RESAMPLES) -> dict[str, Any]:
    """95 % intervals of the p99 ratio and of the error-rate difference of ``subject``
    against ``baseline`` in ``phase``: the seconds both lanes have (the same arrivals),
    resampled with replacement; each resample's figures are computed as the phase's are
    (request-weighted mean of the seconds' p99, errors over requests). ``series`` is the
    summary's: ``p99_ms[lane][group]`` = [[t, p99]], ``errors[lane][group]`` =
    [[t, errors, requests]]. Seeded, so a summary always gives the same intervals.

    >>> s = {"p99_ms": {"a": {"g": [[t, 100.0 + t % 3] for t in range(30)]},
    ...                 "b": {"g": [[t, 200.0] for t in range(30)]}},
    ...      "errors": {"a": {"g": [[t, 0, 10] for t in range(30)]},
    ...                 "b": {"g": [[t, 1, 10] for t in range(30)]}}}
    >>> iv = intervals(s, "a", "b", "g", "overall", {})
    >>> iv["windows"], 0.5 < iv["p99_ratio_ci95"][0] < iv["p99_ratio_ci95"][1] < 0.52
    (30, True)
    >>> iv["error_diff_ci95"]
    [-0.1, -0.1]
    """
    def rows(lane: str) -> dict[float, tuple[float, float, float]]:
        p99 = {t: v for t, v in series["p99_ms"][lane][group]}
        return {t: (p99[t], e, n) for t, e, n in series["errors"][lane][group]
                if n and t in p99 and (phase == "overall" or phase_at(t, windows) == phase)}

    a, b = rows(subject), rows(baseline)
    ts = sorted(set(a) & set(b))
    out: dict[str, Any] = {"windows": len(ts), "p99_ratio_ci95": None,
                           "error_diff_ci95": None}
    if len(ts) < MIN_WINDOWS:
        return out
    xa, xb = np.array([a[t] for t in ts]), np.array([b[t] for t in ts])
    idx = np.random.default_rng(0).integers(0, len(ts), size=(resamples, len(ts)))

    def stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = x[idx, 2].sum(axis=1)
        return (x[idx, 0] * x[idx, 2]).sum(axis=1) / n, x[idx, 1].sum(axis=1) / n

    pa, ea = stats(xa)
    pb, eb = stats(xb)
    r = np.percentile(pa / pb, [2.5, 97.5])
    d = np.percentile(ea - eb, [2.5, 97.5])
    out["p99_ratio_ci95"] = [round(float(r[0]), 3), round(float(r[1]), 3)]
    out["error_diff_ci95"] = [round(float(d[0]), 5), round(float(d[1]), 5)]
    return out


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
                                         "interval": "95 % paired bootstrap over the "
                                                     f"phase's seconds, {RESAMPLES} "
                                                     "resamples, seeded",
                                         "min_windows": MIN_WINDOWS,
                                         "skill_target": SKILL_TARGET,
                                         "coverage_target": list(COVERAGE_TARGET)}}
    claims: list[dict[str, Any]] = []
    statements: list[dict[str, Any]] = []
    for base in ("round-robin", "peak-ewma"):  # all clients together, as before
        for ph in PHASES:
            out[f"p99_ratio_vs_{base}_{ph}"] = _ratio(pol["predictive"]["all"][ph]["p99_ms"],
                                                      pol[base]["all"][ph]["p99_ms"])
    _latency_claims(pol, {"p99_ms": q["p99"], "errors": q["errors"]}, q["phase_windows"],
                    claims, statements)
    # Forecast skill at the planner's horizon, per client group.
    _forecast_claims(q["skill"], claims, statements)
    _planner_claims(q["skill"], claims, statements)
    _mirror_claim(q["lead"], out, claims, statements)
    if machine:
        _machine_claim(machine, claims, statements)
    # Prediction won only where none of its claims lost (the machine's load is context).
    out["predictive_wins"] = not any(c["verdict"] == "lost" for c in claims
                                     if c["kind"] != "machine")
    out["claims"] = claims
    out["statements"] = statements
    return out


def _said(claims: list[dict[str, Any]], ids: list[str]) -> str:
    """The tone of the statement made of the claims ``ids``."""
    return tone([c["verdict"] for c in claims if c["id"] in ids])


def _latency_claims(pol: dict[str, Any], series: dict[str, Any],
                    windows: dict[str, Any], claims: list[dict[str, Any]],
                    statements: list[dict[str, Any]]) -> None:
    """Per client group and baseline: predictive's p99 and errors in each phase."""
    for g, title in GROUPS.items():
        for base in BASELINES:
            ids, parts = [], []
            for ph in PHASES:
                a, b = pol["predictive"][g][ph], pol[base][g][ph]
                if not a["requests"] or not b["requests"]:
                    continue
                r = _ratio(a["p99_ms"], b["p99_ms"])
                iv = intervals(series, "predictive", base, g, ph, windows)
                c = {"id": f"{g}:predictive-vs-{base}:{ph}", "kind": "latency", "group": g,
                     "subject": "predictive", "baseline": base, "phase": ph,
                     "p99_ms": a["p99_ms"], "baseline_p99_ms": b["p99_ms"], "ratio": r,
                     "error_rate": a["error_rate"], "baseline_error_rate": b["error_rate"],
                     # too few seconds for an interval: nothing can be told apart
                     **iv, "verdict": verdict(r, a["error_rate"], b["error_rate"],
                                              iv["p99_ratio_ci95"] or (0.0, math.inf),
                                              iv["error_diff_ci95"] or (-math.inf, math.inf))}
                claims.append(c)
                ids.append(c["id"])
                ci = iv["p99_ratio_ci95"]
                shown = f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else ""
                parts.append(f"{ph} {c['verdict']} (p99 x{r:.2f}{shown}, errors "
                             f"{a['error_rate'] or 0:.2%} vs {b['error_rate'] or 0:.2%})"
                             if r is not None else f"{ph}: no data")
            what = ("the ablation: the forecast's own share" if base == "predictive-persistence"
                    else "reactive")
            statements.append({
                "group": g, "tone": _said(claims, ids), "claims": ids,
                "text": f"{title}: predictive vs {base} ({what}): " + "; ".join(parts)})


def _skill_claim(kind: str, series: str, g: str, base: str, st: dict[str, Any],
                 horizon_s: int) -> dict[str, Any]:
    m = st[f"mase_vs_{base}"]
    return {"id": f"{g}:{kind}-vs-{base}", "kind": "forecast", "series": series,
            "group": g, "baseline": base.replace("_", "-"), "horizon_s": horizon_s,
            "mase": m, "mae": st["mae"], "baseline_mae": st[f"mae_{base}"],
            "points": st["points"], "target": SKILL_TARGET,
            "verdict": "no data" if m is None else "won" if m <= SKILL_TARGET else "lost"}


def _forecast_claims(sk: dict[str, Any], claims: list[dict[str, Any]],
                     statements: list[dict[str, Any]]) -> None:
    """Per client group: the demand forecast's MASE against both naive forecasts and its
    band's coverage."""
    for g, st in sk["groups"].items():
        ids, parts = [], []
        for base in ("seasonal_naive", "persistence"):
            c = _skill_claim("forecast", "demand", g, base, st, sk["horizon_s"])
            claims.append(c)
            ids.append(c["id"])
            m = c["mase"]
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
        served = st.get("vs_served")
        if served:  # the same forecast against the answered requests: said, not hidden
            parts.append(f"against the requests its endpoints and mirrors answered "
                         f"(counted when answered) MASE {served['mase_vs_seasonal_naive']} "
                         f"vs seasonal-naive, {served['mase_vs_persistence']} vs "
                         f"persistence, coverage {served['coverage']}")
        source = st.get("source", "sum of endpoint forecasts")
        what = (f"the forecast of the region's demand series {source} against its counts, "
                "the region's arrivals" if source != "sum of endpoint forecasts"
                else "the sum of its endpoints' forecasts against their requests")
        statements.append({
            "group": g, "tone": _said(claims, ids), "claims": ids,
            "text": f"{g} demand forecast {sk['horizon_s']} s ahead, the horizon the planner "
                    f"and the mirror director act on ({what}), over {st['points']} s: "
                    + "; ".join(parts)})


def _planner_claims(sk: dict[str, Any], claims: list[dict[str, Any]],
                    statements: list[dict[str, Any]]) -> None:
    """Per client group with mirrors: the planner's sum (forecast + mirrors' rate)."""
    for g, st in sk["planner_sums"].items():
        if not st["mirrors"] or not st.get("planner_uses", True):
            continue  # no mirror: the forecast above; a demand series: not what it uses
        ids = []
        for base in ("seasonal_naive", "persistence"):
            c = _skill_claim("planner-sum", "planner", g, base, st, sk["horizon_s"])
            claims.append(c)
            ids.append(c["id"])
        statements.append({
            "group": g, "tone": _said(claims, ids), "claims": ids,
            "text": f"{g} demand as the planner adds it up (plus what the "
                    f"{len(st['mirrors'])} mirror(s) carried when the forecast was made): "
                    f"MASE {st['mase_vs_seasonal_naive']} vs seasonal-naive, MASE "
                    f"{st['mase_vs_persistence']} vs persistence"})


def _mirror_claim(lead: list[dict[str, Any]], out: dict[str, Any],
                  claims: list[dict[str, Any]], statements: list[dict[str, Any]]) -> None:
    """The edge mirrors: ready before the demand crossed capacity, or after."""
    leads = [r["lead_seconds"] for r in lead if r.get("lead_seconds") is not None]
    out["mirror_activations"] = len(lead)
    out["mirror_lead_seconds"] = leads
    # No crossing (NULL lead): demand never went over capacity, said as such, not a number.
    out["mirror_no_crossing"] = len(lead) - len(leads)
    ahead = sum(1 for x in leads if x > 0)
    c = {"id": "edge:mirror-lead", "kind": "mirror", "group": scn.EDGE,
         "activations": len(lead), "ready_before": ahead,
         "ready_after": len(leads) - ahead, "no_crossing": out["mirror_no_crossing"],
         "lead_seconds": leads,
         "verdict": "no data" if not leads else "won" if ahead == len(leads) else "lost"}
    claims.append(c)
    if lead:
        shown = ", ".join("no crossing" if r.get("lead_seconds") is None
                          else f"{r['lead_seconds']:+.1f}s" for r in lead)
        text = (f"{len(lead)} edge mirror activation(s) in the predictive lane: ready "
                f"before the edge demand crossed central capacity in {ahead}, after it in "
                f"{len(leads) - ahead}, no crossing in {out['mirror_no_crossing']} "
                f"(lead {shown})")
    else:
        text = "no edge mirror was activated in the predictive lane"
    statements.append({"group": scn.EDGE, "tone": tone([c["verdict"]]), "claims": [c["id"]],
                       "text": text})


def _machine_claim(machine: dict[str, Any], claims: list[dict[str, Any]],
                   statements: list[dict[str, Any]]) -> None:
    """The machine's load during the live run: context for the latency lines (first)."""
    per_cpu = max(machine["load_1m_at_live_start"], machine["load_1m_at_live_end"]) / max(
        1, machine["cpus"])
    late = int(machine.get("arrivals_sent_late", 0))
    busy = per_cpu > BUSY_LOAD_PER_CPU or late > 0
    c = {"id": "machine-load", "kind": "machine", "group": "all", **machine,
         "load_per_cpu": round(per_cpu, 2), "limit": BUSY_LOAD_PER_CPU,
         "verdict": "lost" if busy else "tie"}
    claims.append(c)
    lag = (f"; the load generator sent {late} arrivals over {scn.LATE_ARRIVAL_S:g} s late (up to "
           f"{machine.get('max_send_lateness_s', 0):.1f} s), then in a burst" if late else "")
    statements.insert(0, {
        "group": "all", "tone": "lose" if busy else "neutral", "claims": [c["id"]],
        "text": (f"machine load during the live run: {per_cpu:.2f} runnable processes per "
                 f"CPU ({machine['cpus']} CPUs){lag}"
                 + (": the lanes' latencies measure CPU contention more than the "
                    "policies; rerun on an idle machine before trusting the p99 lines"
                    if busy else ": the lanes were not starved of CPU"))})
