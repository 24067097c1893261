"""Routing policies, the weight table and the router: plain values in, values out."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Any

import pytest

from processors.forecasting import ForecastPoint
from processors.scoring import CapacityEstimate, load_score_record
from streams.sidecar.config import SidecarSettings, Upstream, UpstreamConfigError, load_upstreams
from streams.sidecar.policies import Endpoint, fallback_order, make_policy, shed_plan
from streams.sidecar.router import Router
from streams.sidecar.testing import score_record
from streams.sidecar.weights import WeightTable


def eps(*weights: float) -> list[Endpoint]:
    return [Endpoint(f"e{i}", f"http://127.0.0.1:{9000 + i}", weight=w)
            for i, w in enumerate(weights)]


def shares(picks: list[str]) -> dict[str, float]:
    c = Counter(picks)
    return {k: v / len(picks) for k, v in sorted(c.items())}


def test_predictive_follows_weights_when_idle() -> None:
    pol = make_policy("predictive", random.Random(7))
    e = eps(1.0, 0.5, 1 / 6)
    got = shares([pol.pick(e, 0.0).id for _ in range(20_000)])
    total = 1 + 0.5 + 1 / 6
    for i, w in enumerate((1.0, 0.5, 1 / 6)):
        assert got[f"e{i}"] == pytest.approx(w / total, abs=0.015)


def test_predictive_steers_away_from_a_backed_up_endpoint() -> None:
    pol = make_policy("predictive", random.Random(1))
    e = eps(1.0, 1.0)
    e[0].in_flight = 50
    got = shares([pol.pick(e, 0.0).id for _ in range(5000)])
    assert got["e1"] > 0.7  # P2C: the idle one wins whenever it is drawn


def test_predictive_never_picks_zero_weight_unless_all_are_zero() -> None:
    pol = make_policy("predictive", random.Random(2))
    e = eps(1.0, 0.0)
    assert {pol.pick(e, 0.0).id for _ in range(500)} == {"e0"}
    z = eps(0.0, 0.0)
    assert {pol.pick(z, 0.0).id for _ in range(500)} == {"e0", "e1"}  # still routes


def test_predictive_sees_a_slow_endpoint_as_fast_as_peak_ewma() -> None:
    # equal weights, equal in-flight: only the latency signal tells them apart
    e = eps(1.0, 1.0)
    e[0].observe_rtt(800.0, 1.0)
    e[1].observe_rtt(100.0, 1.0)
    for name in ("predictive", "peak-ewma"):
        pol = make_policy(name, random.Random(3))
        got = shares([pol.pick(e, 1.0).id for _ in range(2000)])
        assert got["e1"] == 1.0  # P2C over two distinct endpoints: the fast one always


def test_predictive_divides_cost_by_weight() -> None:
    pol = make_policy("predictive", random.Random(4))
    e = eps(4.0, 1.0)
    for x in e:
        x.observe_rtt(100.0, 1.0)
    e[0].in_flight, e[1].in_flight = 3, 1  # cost 400/4 < 200/1: the heavy one still wins
    got = shares([pol.pick(e, 1.0).id for _ in range(2000)])
    assert got["e0"] == 1.0


def test_predictive_trusts_a_weight_less_once_its_endpoint_slows_down() -> None:
    # weights 2:1 from the last scores; then e0's service time triples (its capacity is now
    # 2/3 of e1's) and the next scores are not in yet
    e = eps(1.0, 0.5)
    for t in range(60):
        for x in e:
            x.observe_rtt(100.0, float(t))
    for x in e:
        x.rtt_at = 0.0  # no cost to compare: each is drawn by its weight alone
    pol = make_policy("predictive", random.Random(5))
    idle = shares([pol.pick(e, 60.0).id for _ in range(6000)])
    for t in range(60, 66):
        e[0].observe_rtt(300.0, float(t))
        e[1].observe_rtt(100.0, float(t))
    assert e[0].slowdown() > 2.0 and e[1].slowdown() == 1.0
    for x in e:
        x.rtt_at = 0.0  # again no cost: only the slowdown tells them apart
    slow = shares([pol.pick(e, 66.0).id for _ in range(6000)])
    assert idle["e0"] == pytest.approx(2 / 3, abs=0.02)
    assert slow["e0"] < 0.5  # drawn by weight / slowdown: below e1's share now


def test_prequal_prefers_cold_low_latency_and_keeps_a_bounded_pool() -> None:
    pol = make_policy("prequal", random.Random(5))
    e = eps(*([1.0] * 20))
    for i, x in enumerate(e):
        x.observe_rif_latency(100.0 + 10 * i)  # latency of successes at in-flight 0
    e[0].in_flight = 40  # fastest by latency but hot: the hot-cold rule skips it
    picks = Counter(pol.pick(e, 1.0 + k * 1e-3).id for k in range(400))
    assert picks["e0"] == 0
    assert len(pol.pool) <= 16  # type: ignore[attr-defined]
    assert pol.probes_sent == 3 * 400  # type: ignore[attr-defined]
    # low-latency endpoints are preferred among the cold ones
    assert picks["e1"] + picks["e2"] + picks["e3"] > picks["e17"] + picks["e18"] + picks["e19"]


def test_prequal_is_a_configurable_policy() -> None:
    assert SidecarSettings(policy="prequal").policy == "prequal"
    r = Router([Upstream(id="a", url="http://127.0.0.1:9001"),
                Upstream(id="b", url="http://127.0.0.1:9002")], policy="prequal")
    route = r.routes["default"]
    assert route.policy.name == "prequal"
    assert route.active_policy(True).name == "prequal"  # needs no scores


def test_first_available_round_robin_least_request() -> None:
    e = eps(1, 1, 1)
    assert {make_policy("first-available").pick(e, 0).id for _ in range(10)} == {"e0"}
    rr = make_policy("round-robin")
    assert Counter(rr.pick(e, 0).id for _ in range(30)) == {"e0": 10, "e1": 10, "e2": 10}
    lr = make_policy("least-request", random.Random(3))
    e[1].in_flight, e[2].in_flight = 5, 5
    got = shares([lr.pick(e, 0).id for _ in range(3000)])
    assert got["e0"] == pytest.approx(2 / 3, abs=0.04)  # wins every pair it is in


def test_peak_ewma_is_peak_sensitive_and_decays() -> None:
    a = Endpoint("a", "http://127.0.0.1:1")
    a.observe_rtt(10.0, 100.0)
    a.observe_rtt(200.0, 100.1)  # a slow response is taken at once
    assert a.rtt_ms == 200.0
    a.observe_rtt(10.0, 100.2)  # a fast one only decays in (10 s constant)
    assert a.rtt_ms > 190.0
    a.observe_rtt(10.0, 140.0)  # 40 s later it has caught up
    assert a.rtt_ms < 20.0
    # cost = rtt x (in-flight + 1): a fast but busy endpoint can cost more than a slow one
    b = Endpoint("b", "http://127.0.0.1:2")
    b.observe_rtt(30.0, 140.0)
    a.in_flight = 5
    assert a.cost(140.0) > b.cost(140.0)
    pol = make_policy("peak-ewma", random.Random(4))
    assert {pol.pick([a, b], 140.0).id for _ in range(100)} == {"b"}


def test_ejection_after_consecutive_failures_and_readmission() -> None:
    e = Endpoint("a", "http://127.0.0.1:1")
    for _ in range(2):
        assert not e.failed(10.0, eject_after=3, eject_s=5.0)
    e.succeeded()  # a success in between resets the streak
    assert [e.failed(10.0, 3, 5.0) for _ in range(3)] == [False, False, True]
    assert not e.available(12.0) and e.available(15.0)
    [e.failed(15.0, 3, 5.0) for _ in range(3)]  # ejected again: twice as long
    assert not e.available(24.0) and e.available(25.0)
    e.succeeded()
    assert e.ejections == 0


@pytest.mark.parametrize(("n", "share", "most"), [(3, 0.1, 1), (1, 0.1, 1), (20, 0.1, 2),
                                                  (4, 0.5, 2)])
def test_overloaded_endpoints_are_never_all_ejected(n: int, share: float, most: int) -> None:
    """Every endpoint answering 5xx (all overloaded): at most ``max_ejected_share`` of them
    are ejected (at least one), so the route keeps routing instead of answering 503 to all;
    the next one goes as soon as one is re-admitted."""
    from streams.sidecar.router import Router

    ups = [Upstream(id=f"e{i}", url=f"http://127.0.0.1:{9000 + i}", api="orders")
           for i in range(n)]
    r = Router(ups, eject_after_failures=3, eject_seconds=5.0, max_ejected_share=share)
    eps = r.routes["orders"].endpoints
    for _ in range(10):
        for e in eps:
            r.failed(e, 1.0)
    out = [e for e in eps if not e.available(1.0)]
    assert len(out) == most
    if n > 1:
        assert r.choose(r.routes["orders"], True, 1.0) is not None
        # the ejected are re-admitted after 5 s: one that kept failing meanwhile goes at once
        kept = next(e for e in eps if e.available(1.0))
        assert r.failed(kept, 6.5) and sum(not e.available(6.5) for e in eps) == 1


def test_fallback_order_by_score_or_cost_and_ejected_last() -> None:
    e = eps(0.2, 1.0, 0.5, 0.9)
    e[3].ejected_until = 99.0
    assert [x.id for x in fallback_order(e[0], e, 1.0, by_score=True)] == ["e1", "e2", "e3"]
    e[1].observe_rtt(50.0, 1.0)
    e[2].observe_rtt(5.0, 1.0)
    assert [x.id for x in fallback_order(e[0], e, 1.0, by_score=False)][:2] == ["e2", "e1"]


def test_shed_plan_drops_lowest_priority_first() -> None:
    assert shed_plan(0.0, {0: 0.5, 5: 0.5}) == {0: 0.0, 5: 0.0}
    assert shed_plan(0.25, {0: 0.5, 5: 0.5}) == {0: 0.5, 5: 0.0}
    plan = shed_plan(0.75, {0: 0.5, 5: 0.5})
    assert plan == {0: 1.0, 5: 0.5}


def test_router_sheds_only_when_every_endpoint_is_over_capacity() -> None:
    ups = [Upstream(id="a", url="http://127.0.0.1:1"), Upstream(id="b", url="http://127.0.0.1:2")]
    r = Router(ups, rng=random.Random(5))
    route = r.routes["default"]
    route.overload = 0.9
    assert not any(r.should_shed(route, p % 10) for p in range(1000))
    route.overload = 2.0  # half the traffic must go: priorities 0-4 are half of it
    for p in range(100):
        r.should_shed(route, p % 10)  # the mix is learnt first
    shed = Counter(p for p in (i % 10 for i in range(4000)) if r.should_shed(route, p))
    assert set(shed) <= {0, 1, 2, 3, 4, 5}
    assert sum(shed.values()) == pytest.approx(2000, rel=0.1)
    assert shed[9] == 0


def test_weight_table_fresh_stale_and_missing_scores() -> None:
    t = WeightTable({"orders": ["a", "b", "c"]})
    assert t.is_stale("orders")
    ch = t.apply_scores([score_record("a", 0.8, api="orders", valid_for_s=1, at_ms=1000),
                         score_record("b", 0.2, api="orders", valid_for_s=1, at_ms=1000)],
                        now_ms=1000)
    assert len(ch) == 1 and not ch[0].stale
    # c has no score: it gets the mean (0.5) -> relative 0.5/0.8
    assert ch[0].weights == pytest.approx({"a": 1.0, "b": 0.25, "c": 0.625})
    assert ch[0].haproxy == {"a": 256, "b": 64, "c": 160}
    # an older score arriving late changes nothing
    assert t.apply_scores([score_record("a", 0.1, api="orders", at_ms=500)], now_ms=1000) == []
    # scores for endpoints we do not route to are counted, not applied
    assert t.apply_scores([score_record("zz", 0.1, api="orders")], now_ms=1000) == []
    assert t.unknown == 1
    assert t.stale_changes(now_ms=1500) == []
    gone = t.stale_changes(now_ms=2001)
    assert gone[0].stale and gone[0].weights == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert gone[0].previous_weights["b"] == pytest.approx(0.25)


def test_weight_table_positive_score_never_rounds_to_zero() -> None:
    t = WeightTable({"x": ["a", "b"]})
    ch = t.apply_scores([score_record("a", 1.0, api="x", at_ms=0),
                         score_record("b", 0.0001, api="x", at_ms=0)], now_ms=0)
    assert ch[0].haproxy == {"a": 256, "b": 1}


def test_anomaly_damps_weight_for_a_while() -> None:
    t = WeightTable({"x": ["a", "b"]}, anomaly_damping=0.5, anomaly_hold_ms=1000)
    t.apply_scores([score_record("a", 0.8, api="x", at_ms=0, valid_for_s=100),
                    score_record("b", 0.8, api="x", at_ms=0, valid_for_s=100)], now_ms=0)
    ch = t.apply_anomalies([{"endpoint_id": "a", "score": 0.9, "threshold": 0.7}], now_ms=0)
    assert ch[0].weights == {"a": 0.5, "b": 1.0}
    assert t.apply_anomalies([{"endpoint_id": "b", "score": 0.1, "threshold": 0.7}], 0) == []
    assert t.stale_changes(now_ms=1001)[0].weights == {"a": 1.0, "b": 1.0}


def scored(e: str, cap: float, rps: float, at_ms: int, p99: float = 150.0,
           err: float = 0.0, source: str = "CONFIGURED", valid_s: float = 20.0) -> dict[str, Any]:
    """A LoadScore the processor would publish for endpoint ``e`` (forecast: flat at
    ``rps``), as the sidecar receives it."""
    rec = load_score_record(
        endpoint_id=e, api="api", region="r", computed_at=at_ms / 1000, step_seconds=10,
        forecast=[ForecastPoint(h, at_ms / 1000 + 10 * h, rps, 0.8 * rps, 1.2 * rps)
                  for h in (1, 2, 3)],
        capacity=CapacityEstimate(cap, source), current_rps=rps, latency_p99_ms=p99,
        error_rate=err)
    rec["valid_until"] = at_ms + int(valid_s * 1000)
    return rec


CAPS = {"big": 300.0, "mid": 100.0, "small": 50.0}


def test_weights_follow_capacity_ratios_whatever_each_share_of_the_load() -> None:
    # The old herding state: the small endpoints are nearly full, the big one is idle-ish;
    # their scores differ by a factor of ~20.  Weights must still be 6:2:1, not follow the
    # scores (which would pile everything onto "big" and move the herd next interval).
    t = WeightTable({"api": list(CAPS)})
    loads = {"big": 60.0, "mid": 95.0, "small": 49.0}
    recs = [scored(e, CAPS[e], loads[e], 0) for e in CAPS]
    assert max(r["score"] for r in recs) > 10 * min(r["score"] for r in recs)
    w = t.apply_scores(recs, now_ms=0)[0].weights
    assert w == pytest.approx({"big": 1.0, "mid": 1 / 3, "small": 1 / 6})
    # and so in steady state too, at low load, where 1 - u^2 hardly tells them apart
    t2 = WeightTable({"api": list(CAPS)})
    w2 = t2.apply_scores([scored(e, CAPS[e], 10.0, 0) for e in CAPS], now_ms=0)[0].weights
    assert w2 == pytest.approx({"big": 1.0, "mid": 1 / 3, "small": 1 / 6})
    # sidecar hints count when the processor only has a default guess
    t3 = WeightTable({"api": list(CAPS)}, capacities=CAPS)
    w3 = t3.apply_scores([scored(e, 100.0, 10.0, 0, source="DEFAULT") for e in CAPS],
                         now_ms=0)[0].weights
    assert w3 == pytest.approx({"big": 1.0, "mid": 1 / 3, "small": 1 / 6})


def test_no_live_endpoint_ever_gets_weight_zero() -> None:
    t = WeightTable({"api": list(CAPS)})
    now = 0
    for rps, p99, err in itertools.product((0.0, 50.0, 99.0, 300.0, 900.0),
                                           (20.0, 800.0, 30_000.0), (0.0, 0.2, 1.0)):
        now += 5000
        recs = [scored("big", 300.0, 100.0, now), scored("mid", 100.0, rps, now, p99, err),
                scored("small", 50.0, rps, now, p99, err)]
        t.apply_scores(recs, now_ms=now)
        w, hap = t.weights("api"), t.haproxy("api")
        assert min(w.values()) > 0 and min(hap.values()) >= 1, (rps, p99, err, w, hap)
    # an explicit 0 (an operator's override) still drains
    t.apply_scores([{**scored("mid", 100.0, 10.0, now + 1), "score": 0.0}], now_ms=now + 1)
    assert t.weights("api")["mid"] == 0.0 and t.haproxy("api")["mid"] == 0


def test_weight_change_per_interval_is_bounded() -> None:
    step = 5000
    t = WeightTable({"api": ["a", "b"]}, max_step=2.0, step_ms=step)
    t.apply_scores([scored(e, 100.0, 50.0, 0, valid_s=600) for e in "ab"], now_ms=0)
    assert t.weights("api") == {"a": 1.0, "b": 1.0}
    # b turns slow (p99 10 s: health 0.05): its weight may halve per interval, no faster
    ratios = []
    for k in range(1, 41):  # ticks of a quarter interval, as the sidecar's stale loop
        now = k * step // 4
        if k % 4 == 0:
            t.apply_scores([scored("a", 100.0, 50.0, now, valid_s=600),
                            scored("b", 100.0, 50.0, now, p99=10_000.0, valid_s=600)], now)
        t.stale_changes(now)
        ratios.append(t.weights("api")["b"])
    per_interval = [ratios[i] / ratios[i + 4] for i in range(len(ratios) - 4)]
    assert max(per_interval) <= 2.0 + 1e-9
    assert ratios[-1] == pytest.approx(0.05, abs=1 / 256)  # but it gets there: health 0.05
    # and back up no faster either
    for k in range(41, 81):
        now = k * step // 4
        t.apply_scores([scored(e, 100.0, 50.0, now, valid_s=600) for e in "ab"], now)
        ratios.append(t.weights("api")["b"])
    up = [ratios[i + 4] / ratios[i] for i in range(39, len(ratios) - 4)]
    assert max(up) <= 2.0 + 1e-9 and ratios[-1] == 1.0


def test_overload_is_the_apis_demand_over_its_total_capacity() -> None:
    t = WeightTable({"api": list(CAPS)})
    # one endpoint at 3x its capacity is not an overload of the API (0.5 overall) ...
    t.apply_scores([scored("big", 300.0, 100.0, 0), scored("mid", 100.0, 25.0, 0),
                    scored("small", 50.0, 150.0, 0)], now_ms=0)
    assert t.overload("api", 0) == pytest.approx(275 / 450)
    # ... every endpoint over capacity in sum is, whatever the split
    t.apply_scores([scored("big", 300.0, 500.0, 1), scored("mid", 100.0, 100.0, 1),
                    scored("small", 50.0, 75.0, 1)], now_ms=1)
    assert t.overload("api", 1) == pytest.approx(675 / 450)
    # shedding goes by the next step, lead-time decisions by the peak of the horizon
    rising = scored("mid", 100.0, 100.0, 2)
    rising["forecast"] = [{**p, "mean": 100.0 + 50 * p["horizon"]} for p in rising["forecast"]]
    rising["predicted_utilization"] = 2.5
    t.apply_scores([rising], now_ms=2)
    assert t.overload("api", 2) == pytest.approx(725 / 450)
    assert t.overload("api", 2, horizon="peak") == pytest.approx(825 / 450)


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"id": "a", "url": "ftp://127.0.0.1:1"}, "upstreams.0.url"),
        ({"id": "a", "url": "http://127.0.0.1"}, "upstreams.0.url"),
        ({"id": "a b", "url": "http://127.0.0.1:1"}, "upstreams.0.id"),
        ({"id": "a", "url": "http://127.0.0.1:1", "capacity_rps": -5}, "upstreams.0.capacity_rps"),
        ({"id": "a", "url": "http://127.0.0.1:1", "weigth": 3}, "upstreams.0.weigth"),
    ],
)
def test_malformed_upstream_file_names_the_field(tmp_path, entry, field) -> None:  # type: ignore[no-untyped-def]
    import json

    p = tmp_path / "ups.json"
    p.write_text(json.dumps([entry]))
    with pytest.raises(UpstreamConfigError, match=field.replace(".", r"\.")):
        load_upstreams(p)


def test_upstreams_file_toml_and_duplicates(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "ups.toml"
    p.write_text('[[upstreams]]\nid = "a"\nurl = "http://127.0.0.1:9001"\napi = "orders"\n'
                 '[[upstreams]]\nid = "a"\nurl = "http://127.0.0.1:9002"\napi = "orders"\n')
    s = SidecarSettings(upstreams_file=p)
    with pytest.raises(UpstreamConfigError, match=r"upstreams\.1\.id: duplicate"):
        s.resolved_upstreams()
    p.write_text("[[upstreams]\n")
    with pytest.raises(UpstreamConfigError, match="does not parse"):
        SidecarSettings(upstreams_file=p).resolved_upstreams()


def test_a_guessed_capacity_never_sheds_and_a_learned_one_needs_confirming() -> None:
    t = WeightTable({"api": list(CAPS)})
    # DEFAULT guesses (the processor knows nothing): no capacity, no overload, equal weights
    w = t.apply_scores([scored(e, 100.0, 600.0, 0, source="DEFAULT") for e in CAPS], 0)
    assert w[0].weights == {"big": 1.0, "mid": 1.0, "small": 1.0}
    assert t.capacity_source("api") == "none" and t.total_capacity("api", 0) is None
    assert t.overload("api", 0) == 0.0
    # a knee seen once is not trusted yet; three in a row (within 2x) are
    for k in range(1, 4):
        t.apply_scores([scored(e, CAPS[e], 10.0, k * 5000, source="LEARNED") for e in CAPS],
                       k * 5000)
        c = t.capacity("api", "big")
        assert c.source == "learned" and c.confidence == pytest.approx(k / 3)
        assert (t.total_capacity("api", k * 5000) is None) == (k < 3)
    assert t.capacity_source("api") == "learned" and t.total_capacity("api", 15000) == 450.0
    for k in range(4, 7):  # weights move there at most 2x per interval
        t.apply_scores([scored(e, CAPS[e], 10.0, k * 5000, source="LEARNED") for e in CAPS],
                       k * 5000)
    assert t.weights("api") == pytest.approx({"big": 1.0, "mid": 1 / 3, "small": 1 / 6})
    # a knee that jumps 10x starts over; a configured hint covers for it meanwhile
    t2 = WeightTable({"api": ["big"]}, capacities={"big": 250.0})
    for k, cap in enumerate((300.0, 300.0, 300.0, 3000.0)):
        t2.apply_scores([scored("big", cap, 10.0, k, source="LEARNED")], k)
    assert t2.capacity("api", "big").rps == 250.0
    assert t2.capacity("api", "big").source == "configured"


def test_router_sheds_by_offered_rate_over_known_capacity() -> None:
    ups = [Upstream(id="a", url="http://127.0.0.1:1")]
    r = Router(ups, rng=random.Random(3), rate_window_s=0.5)
    route = r.routes["default"]
    shed = [r.should_shed(route, 5, now=1.0 + i / 400) for i in range(800)]  # 400/s, 2 s
    assert not any(shed)  # capacity unknown: never
    route.capacity_rps = 100.0
    now = 3.0
    shed = [r.should_shed(route, 5, now=now + i / 400) for i in range(800)]
    # 3/4 of the offered 400/s must go (shed requests are counted as offered)
    assert sum(shed[400:]) == pytest.approx(300, rel=0.15)
    now += 2.0
    shed = [r.should_shed(route, 5, now=now + i / 50) for i in range(100)]  # 50/s now
    assert not any(shed[int(0.5 * 2 * 50):])  # within two windows
    assert r.update_overload(route, now + 1.99) == pytest.approx(0.5, rel=0.1)
    assert r.update_overload(route, now + 3.0) == 0.0  # no requests: no load
