"""Routing policies, the weight table and the router: plain values in, values out."""

from __future__ import annotations

import random
from collections import Counter

import pytest

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
