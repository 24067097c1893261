"""The demo's time shape gives the forecasts something to learn, offline: its compressed
days of history and its seeded live arrivals (``loadcast.demo.scenario``) through the
worker's default forecaster at the demo's settings (1-s steps, a 60-s season, 15 horizons),
scored as the report scores them (``loadcast.demo.measures.skill``) at the planner's 5-s
horizon. What the full demo measures on top (telemetry, CPU contention) is not here: this
is the forecast on an idle machine, and the regression guard for the demo's shape."""

from __future__ import annotations

import pytest

from loadcast.demo import DEFAULT_TRACE
from loadcast.demo import scenario as scn
from loadcast.demo.headline import COVERAGE_TARGET, SKILL_TARGET
from loadcast.demo.measures import HORIZON, skill
from processors.forecasting import make_forecaster
from streams.edge.replay import read_trace, trace_path

pytestmark = pytest.mark.slow


def demand_skill(sc: scn.Scenario, region: str, gap_s: int = 20) -> dict[str, float]:
    """The region's demand (the central endpoints' sum, the edge's demand series) as
    the demo sends it: history replayed without noise, then the live run's Poisson
    arrivals ``gap_s`` after the history's end; the forecast skill over the live run."""
    shapes = scn.day_shapes(read_trace(trace_path(DEFAULT_TRACE)), sc.season_s)
    live_off = sc.history_seasons * sc.season_s + gap_s
    f = make_forecaster("default", step_seconds=1, season_seconds=sc.season_s, max_horizon=15)
    col = 0 if region == scn.CENTRAL else 1
    actual: dict[int, float] = {}
    for sec in range(live_off):
        actual[sec] = float(round(scn.rates_at(sc, shapes, sec)[col]))
        f.learn(sec, actual[sec])
    counts = [0] * sc.live_seconds
    for t, r in scn.schedule(sc, shapes, live_off):
        counts[int(t)] += r == region
    fc: dict[int, tuple[float, float, float]] = {}
    for k, n in enumerate(counts):
        p = f.forecast(15)[HORIZON - 1]  # made with what was known one step before k
        fc[live_off + k - 1 + HORIZON] = (p.mean, p.lower, p.upper)
        actual[live_off + k] = float(n)
        f.learn(live_off + k, float(n))
    end = live_off + sc.live_seconds - 1
    return skill(actual, {t: v for t, v in fc.items() if live_off <= t < end},
                 sc.season_s, HORIZON)


@pytest.mark.parametrize("region", [scn.CENTRAL, scn.EDGE])
def test_the_demand_forecast_beats_both_naive_forecasts_at_the_planners_horizon(
        region: str) -> None:
    r = demand_skill(scn.Scenario(), region)
    assert r["points"] >= 200
    assert r["mase_vs_seasonal_naive"] <= SKILL_TARGET, r
    assert r["mase_vs_persistence"] <= SKILL_TARGET, r
    lo, hi = COVERAGE_TARGET
    assert lo <= r["coverage"] <= hi, r
