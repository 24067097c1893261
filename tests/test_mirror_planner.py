"""The mirror planner's rules (pure): lead time, hysteresis and cool-down, flapping,
sequences and signatures, restore, and which scores count."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest

from processors.apps.mirror_settings import MirrorSettings
from processors.mirroring import (
    BundleSpec,
    DemandTable,
    MirrorPlanner,
    PlannerConfig,
    demand_series_id,
)
from processors.signing import Signer, Verifier, generate_keypair

DIGEST = "sha256:" + "ab" * 32
PRIVATE, PUBLIC = generate_keypair()
T0 = 1_800_000_000_000


def score(now_ms: int, demand: Callable[[float], float], *, endpoint: str = "orders-eu-1",
          region: str = "eu", api: str = "orders", capacity: float = 100.0,
          horizon: int = 15, valid_ms: int = 2000, lag_ms: int = 0) -> dict[str, Any]:
    """A LoadScore whose forecast is ``demand`` (seconds since T0 -> rps), made ``lag_ms``
    ago."""
    computed = now_ms - lag_ms
    t = (computed - T0) / 1000
    return {
        "endpoint_id": endpoint, "api": api, "region": region, "computed_at": computed,
        "valid_until": computed + valid_ms, "capacity_rps": capacity,
        "current_rps": demand(t), "step_seconds": 1,
        "forecast": [{"horizon": h, "at": computed + 1000 * h, "mean": demand(t + h),
                      "lower": 0.8 * demand(t + h), "upper": 1.2 * demand(t + h)}
                     for h in range(1, horizon + 1)],
    }


def planner(**kw: Any) -> MirrorPlanner:
    bundles = kw.pop("bundles", {"orders": BundleSpec(DIGEST)})
    cfg = PlannerConfig(bundles=bundles, **{"activation_seconds": 2.0, "margin_seconds": 2.0,
                                            "cooldown_seconds": 10.0, **kw})
    return MirrorPlanner(cfg, Signer("k1", PRIVATE))


def run(p: MirrorPlanner, demand: Callable[[float], float], seconds: float,
        step_s: float = 0.5, start_s: float = 0.0, **kw: Any) -> list[tuple[float, dict[str, Any]]]:
    """Feed a score and evaluate every ``step_s``; (time in s, command) pairs."""
    out = []
    for i in range(round((seconds - start_s) / step_s) + 1):
        t = start_s + i * step_s
        now = T0 + round(t * 1000)
        p.observe_score(score(now, demand, **kw), now)
        out += [(t, c) for c in p.evaluate(now)]
    return out


def ramp(t: float) -> float:
    """20 rps, then +10 rps/s from t = 10 s: crosses 100 rps just after t = 18 s."""
    return 20.0 + 10.0 * max(0.0, t - 10.0)


def ahead(cmd: dict[str, Any]) -> float:
    """Seconds from issue to the first point of the command's forecast over capacity."""
    at = next(p["at"] for p in cmd["forecast"] if p["mean"] > cmd["central_capacity_rps"])
    return float(at - cmd["issued_at"]) / 1000


def test_activates_one_lead_time_before_the_predicted_crossing() -> None:
    p = planner()
    cmds = run(p, ramp, 30)
    assert [c["action"] for _, c in cmds] == ["ACTIVATE"]
    t, cmd = cmds[0]
    assert p.lead_seconds("orders") == 4.0  # 2 s activation + 2 s margin
    # Not later than the lead, and not needlessly earlier (the grid step is 1 s).
    assert 3.0 < ahead(cmd) <= 4.0 and 13.5 <= t <= 15.0, t
    assert cmd["api"] == "orders" and cmd["region"] == "eu" and cmd["bundle_digest"] == DIGEST
    assert cmd["desired_instances"] == 1 and cmd["central_capacity_rps"] == 100.0
    assert cmd["expires_at"] - cmd["issued_at"] == 120_000
    assert any(p["mean"] > 100 for p in cmd["forecast"]), "the triggering forecast"
    assert "> central capacity 100.0 rps" in cmd["reason"]

    # A slower measured activation (command -> READY) moves the next activation earlier.
    p2 = planner()
    p2.observe_status({"command_id": "unknown", "state": "READY", "at": T0})  # not ours
    first = run(p2, ramp, 30)[0][1]
    measured = p2.observe_status({"command_id": first["command_id"], "state": "READY",
                                  "api": "orders", "region": "eu",
                                  "at": first["issued_at"] + 6500})
    assert measured == 6.5 and p2.lead_seconds("orders") == 8.5
    p3 = planner()
    p3.activation_s["orders"] = p2.activation_s["orders"]
    t3, cmd3 = run(p3, ramp, 30)[0]
    assert 7.5 < ahead(cmd3) <= 8.5 and t3 < t - 3.5


def test_retires_after_a_cooldown_of_low_demand_with_hysteresis() -> None:
    p = planner()
    assert run(p, lambda t: 150.0, 5)  # active
    # 90 rps: below capacity but above 0.8 x capacity: held, however long.
    assert run(p, lambda t: 90.0, 60, start_s=5) == []
    # 50 rps: retired once low for the cool-down (10 s), not before.
    cmds = run(p, lambda t: 50.0, 80, start_s=60.5)
    assert [c["action"] for _, c in cmds] == ["RETIRE"]
    t, retire = cmds[0]
    assert 70.0 <= t <= 71.0
    assert retire["desired_instances"] == 0 and retire["bundle_digest"] == DIGEST
    assert "for 10.0 s" in retire["reason"]


def check_no_fast_alternation(cmds: list[tuple[float, dict[str, Any]]], cooldown: float) -> None:
    changes = [(t, c["action"]) for t, c in cmds]
    for (t1, a1), (t2, a2) in itertools.pairwise(changes):
        if a1 != a2:
            assert t2 - t1 >= cooldown, f"{a1} at {t1} then {a2} at {t2}"


@pytest.mark.parametrize("demand,max_commands", [
    (lambda t: 100.0 + 5.0 * math.copysign(1, math.sin(math.pi * t)), 1),  # 95/105, 2 s
    (lambda t: 100.0 + 60.0 * math.copysign(1, math.sin(math.pi * t / 3)), 1),  # 40/160
    (lambda t: 100.0 + 50.0 * math.sin(2 * math.pi * t / 24), 12),  # slow: 24 s period
    (lambda t: 100.0 + 50.0 * math.sin(2 * math.pi * t / 7), 12),  # 7 s period
])
def test_oscillating_forecast_does_not_flap(demand: Callable[[float], float],
                                            max_commands: int) -> None:
    p = planner()
    cmds = run(p, demand, 240, step_s=0.25, horizon=3)
    assert cmds, "the first crossing activates"
    assert cmds[0][1]["action"] == "ACTIVATE"
    check_no_fast_alternation(cmds, 10.0)
    assert len(cmds) <= max_commands, [(t, c["action"]) for t, c in cmds]


def test_sequences_signatures_and_restore() -> None:
    p = planner()
    cmds = [c for _, c in run(p, ramp, 30)]
    cmds += [c for _, c in run(p, lambda t: 10.0, 60, start_s=30.5)]
    cmds += [c for _, c in run(p, lambda t: 150.0, 80, start_s=60.5)]
    assert [c["action"] for c in cmds] == ["ACTIVATE", "RETIRE", "ACTIVATE"]
    seqs = [c["sequence"] for c in cmds]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    verifier = Verifier({"k1": PUBLIC})
    for c in cmds:
        verifier.verify(c)
        assert c["key_id"] == "k1" and len(c["signature"]) == 64

    # A planner restarted from the topic continues: already active, so no new ACTIVATE
    # while demand stays high; retires when it is low; sequence keeps climbing even if
    # the clock went back.
    q = planner()
    assert q.restore(reversed(cmds)) == 3
    state = q.states[("orders", "eu")]
    assert state.active and state.instances == 1 and state.sequence == seqs[-1]
    assert run(q, lambda t: 150.0, 85, start_s=80.5) == []
    later = run(q, lambda t: 10.0, 100, start_s=85.5)
    assert [c["action"] for _, c in later] == ["RETIRE"]
    assert later[0][1]["sequence"] > seqs[-1]
    r = planner()
    r.restore(cmds)
    now = T0 - 3_600_000  # a clock an hour behind
    r.observe_score(score(now, lambda t: 10.0), now)
    r.states[("orders", "eu")].low_since_ms = now - 20_000
    r.states[("orders", "eu")].last_change_ms = now - 20_000
    (cmd,) = r.evaluate(now)
    assert cmd["sequence"] == seqs[-1] + 1


def test_scale_up_within_the_bundle_limits() -> None:
    p = planner(bundles={"orders": BundleSpec(DIGEST, instance_capacity_rps=60.0,
                                              max_instances=3)})

    def demand(t: float) -> float:  # a plateau at 110 rps, then 260 rps
        return min(110.0, 20.0 + 10.0 * t) if t < 30 else min(260.0, 110.0 + 10.0 * (t - 30))

    cmds = run(p, demand, 60)
    # 110 rps: 2 x 60 rps; then 260 rps would need 5: the bundle's maximum of 3.
    assert [(c["action"], c["desired_instances"]) for _, c in cmds] == [
        ("ACTIVATE", 2), ("ACTIVATE", 3)]


def test_which_scores_count() -> None:
    p = planner(bundles={"orders": BundleSpec(DIGEST)})
    now = T0
    high = lambda t: 500.0  # noqa: E731
    p.observe_score(score(now, high, lag_ms=5000), now)  # stale: valid_until passed
    p.observe_score(score(now, high, region="central", endpoint="c-1"), now)  # central
    p.observe_score(score(now, high, api="billing", endpoint="b-1"), now)  # no bundle
    # a replayed score: fresh, but its whole forecast lies in the past
    old = score(now - 60_000, high, endpoint="orders-eu-2")
    old["computed_at"], old["valid_until"] = now, now + 2000
    p.observe_score(old, now)
    assert p.evaluate(now) == []
    assert p.unplanned == {"billing"}

    t = DemandTable()
    t.apply(score(now, lambda s: 30.0, endpoint="a"))
    t.apply(score(now, lambda s: 50.0 + s, endpoint="b", capacity=40.0))
    d = t.demand("orders", "eu", now + 500)
    assert d is not None and d.endpoints == 2 and d.capacity_rps == 140.0
    assert d.current_rps == pytest.approx(80.0)
    # half-way between the points of 1 s and 2 s: 30 + (51.5 ... ) interpolated
    assert d.points[0][0] == now + 1500 and d.points[0][1] == pytest.approx(30 + 51.5)
    assert t.demand("orders", "eu", now + 60_000) is None  # everything stale by then
    t2 = DemandTable(central_capacity_rps={"orders": 75.0})
    t2.apply(score(now, lambda s: 30.0))
    demand = t2.demand("orders", "eu", now)
    assert demand is not None and demand.capacity_rps == 75.0


def test_settings_validate_and_name_the_field() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="retire_ratio must be <= activate_ratio"):
        MirrorSettings(retire_ratio=1.2)
    with pytest.raises(ValidationError, match="signing_key"):
        MirrorSettings(signing_key="not-a-key")
    with pytest.raises(ValidationError, match=r"bundles\.orders\.digest"):
        MirrorSettings(bundles={"orders": {"digest": "md5:x"}})
    s = MirrorSettings(signing_key=PRIVATE, key_id="k1",
                       bundles={"orders": {"digest": DIGEST, "max_instances": 2}})
    assert s.planner_config().bundles["orders"].max_instances == 2
    s.verifier().verify(s.signer().sign({"command_id": "x"}))  # own public key by default
    with pytest.raises(ValueError, match="trusted_keys is empty"):
        MirrorSettings().verifier()


def test_a_mirror_counts_what_it_carries_not_its_own_forecast() -> None:
    """A mirror's cold forecast of diverted demand must not add to the regular endpoints'
    forecast of the same demand (the planner counted it twice, and a retired mirror's
    lingering forecast kept demand up after the spike)."""
    now = T0
    t = DemandTable(central_capacity_rps={"orders": 40.0})
    t.apply(score(now, lambda s: 60.0, endpoint="orders-eu-1"))
    mirror = "orders-mirror-eu-127.0.0.1-9100"
    carrying = score(now, lambda s: 25.0, endpoint=mirror)
    carrying["current_rps"] = 10.0  # carries 10 rps now; its forecast says 25
    t.apply(carrying)
    d = t.demand("orders", "eu", now)
    assert d is not None and d.endpoints == 2 and d.current_rps == pytest.approx(70.0)
    assert all(m == pytest.approx(70.0) for _, m, _, _ in d.points)
    idle = score(now + 100, lambda s: 25.0, endpoint=mirror)
    idle["current_rps"] = 0.0  # no traffic any more; the forecast still lingers at 25
    t.apply(idle)
    d = t.demand("orders", "eu", now + 100)
    assert d is not None and d.peak() == pytest.approx(60.0)


def test_the_regions_demand_series_alone_is_its_demand_while_fresh() -> None:
    """The region's demand series (what the sidecar saw the region ask for, whichever
    endpoint or mirror served it) replaces the sum of endpoints and mirrors while it has a
    fresh score: the endpoints' series are censored by the mirror, the region's is not.
    Capacity stays the endpoints'; a stale demand series falls back to the sum."""
    now = T0
    t = DemandTable()
    t.apply(score(now, lambda s: 5.0, endpoint="orders-eu-1", capacity=20.0))
    mirror = score(now, lambda s: 0.0, endpoint="orders-mirror-eu-127.0.0.1-9100",
                   capacity=50.0)
    mirror["current_rps"] = 30.0
    t.apply(mirror)
    region = score(now, lambda s: 35.0 + 10.0 * s, endpoint=demand_series_id("orders", "eu"),
                   capacity=999.0, valid_ms=3000)
    t.apply(region)
    d = t.demand("orders", "eu", now)
    assert d is not None and d.current_rps == pytest.approx(35.0)
    assert [round(m) for _, m, _, _ in d.points[:3]] == [45, 55, 65]
    assert d.capacity_rps == pytest.approx(70.0)  # endpoint and mirror, not the series' 999
    assert d.endpoints == 2
    # the endpoints' scores are renewed, the region's is not: back to their sum
    t.apply(score(now + 2500, lambda s: 5.0, endpoint="orders-eu-1", capacity=20.0))
    later = now + 3500
    d = t.demand("orders", "eu", later)
    assert d is not None and d.current_rps == pytest.approx(5.0)
