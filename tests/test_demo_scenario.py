"""The demo's phases each measure one thing: the live run never starts inside or just
before an edge spike, and the central slow-down keeps clear of every spike, whatever
second the set-up finishes in."""

from __future__ import annotations

import pytest

from loadcast.demo.scenario import SPIKE_LEAD_S, Scenario


@pytest.mark.parametrize("sc", [Scenario(), Scenario.quick()], ids=["full", "quick"])
def test_phases_keep_apart_for_every_live_start(sc: Scenario) -> None:
    t0 = 1_000.0
    a, b, _ = sc.spike
    for ready in range(sc.season_s):  # the set-up may end at any second of a season
        t_live = sc.live_start(t0, t0 + 400 + ready + 0.5)
        assert t_live >= t0 + 400 + ready + 0.5 and t_live - (t0 + 400 + ready) <= 20
        pos = (t_live - t0) % sc.season_s
        assert not a - SPIKE_LEAD_S <= pos < b + 3, pos
        spikes = sc.spike_windows(t0, t_live)
        # every spike of the live run whole (none cut by the start)
        assert spikes and all(y - x == b - a for x, y in spikes[:-1]), spikes
        d0, d1 = sc.degrade_window(t0, t_live)
        assert t_live <= d0 < d1 <= t_live + sc.live_seconds
        assert all(d1 + 3 <= x or d0 >= y + 3 for x, y in spikes), (d0, d1, spikes)
