"""LoadScore: monotonicity, the Avro-ready record, capacity learning, sidecar helpers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from processors.forecasting import ForecastPoint
from processors.scoring import (
    CapacityEstimate,
    CapacityEstimator,
    compute_score,
    load_score_record,
)
from streams.sidecar.routing_weights import (
    capacity_weights,
    haproxy_weights,
    limit_change,
    prioritize,
    prioritize_by_api,
    routing_weights,
    split_score,
)

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "LoadScore.avsc"


def _fc(mean: float, spread: float = 0.1, n: int = 5) -> list[ForecastPoint]:
    return [
        ForecastPoint(h, 60.0 * h, mean, mean * (1 - spread), mean * (1 + spread))
        for h in range(1, n + 1)
    ]


def _score(**kw: float) -> float:
    args: dict[str, float] = {
        "capacity_rps": 100.0,
        "current_rps": 30.0,
        "latency_p99_ms": 100.0,
        "error_rate": 0.0,
        "anomaly_score": 0.0,
    }
    mean = kw.pop("mean", 30.0)
    args.update(kw)
    return compute_score(_fc(mean), **args).score  # type: ignore[arg-type]


def test_more_predicted_load_means_lower_score() -> None:
    scores = [_score(mean=m) for m in np.linspace(0, 130, 27)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(a >= b for a, b in itertools.pairwise(scores))
    assert scores[0] > scores[10] > scores[20]  # strictly down below saturation
    assert scores[-1] == 0.0  # predicted over capacity


def test_prediction_matters_even_when_current_load_is_low() -> None:
    assert _score(mean=95.0, current_rps=10.0) < 0.2 * _score(mean=10.0, current_rps=10.0)


def test_more_errors_higher_latency_and_anomalies_mean_lower_score() -> None:
    errs = [_score(error_rate=e) for e in (0.0, 0.01, 0.05, 0.2, 1.0)]
    assert all(a > b for a, b in itertools.pairwise(errs))
    lat = [_score(latency_p99_ms=v) for v in (100, 500, 800, 5000)]
    assert lat[0] == lat[1] > lat[2] > lat[3]
    anom = [_score(anomaly_score=a) for a in (0.0, 0.5, 0.99)]
    assert anom[0] > anom[1] > anom[2]
    flagged = compute_score(
        _fc(30.0), capacity_rps=100, current_rps=30, latency_p99_ms=100, error_rate=0,
        anomaly_score=0.99, anomalous=True,
    )
    assert flagged.score < anom[2]
    assert any("anomal" in r for r in flagged.reasons)


def test_wider_band_is_riskier() -> None:
    def at(spread: float) -> float:
        return compute_score(
            _fc(60.0, spread=spread), capacity_rps=100, current_rps=50, latency_p99_ms=10,
            error_rate=0,
        ).score

    narrow, wide = at(0.05), at(0.5)
    assert wide < narrow


def test_bad_inputs_stay_in_range() -> None:
    b = compute_score(
        [ForecastPoint(1, 60.0, float("nan"), -1.0, float("inf"))],
        capacity_rps=0.0, current_rps=float("nan"), latency_p99_ms=-5, error_rate=7.0,
    )
    assert 0.0 <= b.score <= 1.0
    idle = compute_score([], capacity_rps=10, current_rps=0, latency_p99_ms=0, error_rate=0)
    assert idle.score == 1.0


def test_record_matches_the_avro_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    rec = load_score_record(
        endpoint_id="ep-1", api="orders", region="eu-west", computed_at=1_700_000_000.5,
        step_seconds=60, forecast=_fc(90.0), capacity=CapacityEstimate(100.0, "DEFAULT"),
        current_rps=80.0, latency_p99_ms=900.0, error_rate=0.1, anomaly_score=0.3,
    )
    assert set(rec) == {f["name"] for f in schema["fields"]}
    assert rec["computed_at"] == 1_700_000_000_500
    assert rec["valid_until"] == rec["computed_at"] + 120_000
    assert isinstance(rec["computed_at"], int) and isinstance(rec["forecast"][0]["at"], int)
    assert 0.0 <= rec["score"] <= 1.0
    assert rec["capacity_source"] == "DEFAULT"
    assert rec["predicted_utilization"] == pytest.approx(0.9)
    text = " ".join(rec["reasons"])
    for word in ("utilization", "error rate", "p99", "default"):
        assert word in text
    try:
        import fastavro  # the consumer side validates with the real schema when available
    except ImportError:  # pragma: no cover
        return
    named: dict[str, dict[str, Any]] = {}
    fastavro.parse_schema(
        json.loads((SCHEMA.parent / "ForecastPoint.avsc").read_text()), named_schemas=named
    )
    assert fastavro.validate(rec, fastavro.parse_schema(schema, named_schemas=named))


def test_capacity_learned_from_the_latency_knee() -> None:
    rng = np.random.default_rng(0)
    est = CapacityEstimator(default_rps=10.0)
    assert est.estimate().source == "DEFAULT"
    for _ in range(3000):
        rate = float(rng.uniform(1, 400))
        p99 = 40 + rng.normal(0, 3) + (0 if rate < 200 else (rate - 200) * 2)
        est.update(rate, p99)
    e = est.estimate()
    assert e.source == "LEARNED"
    assert 150 <= e.rps <= 240


def test_capacity_without_knee_falls_back() -> None:
    est = CapacityEstimator(default_rps=10.0, configured_rps=75.0)
    for rate in range(1, 300):
        est.update(float(rate), 40.0)
    assert est.estimate() == CapacityEstimate(75.0, "CONFIGURED")
    flat = CapacityEstimator(default_rps=10.0)
    for rate in range(1, 300):
        flat.update(float(rate), 40.0)
    e = flat.estimate()
    assert e.source == "DEFAULT" and e.rps >= 299  # it took that much without a climb
    with pytest.raises(ValueError):
        CapacityEstimate(1.0, "GUESSED")


def test_prioritize_is_descending_and_stable() -> None:
    scores = [
        {"endpoint_id": "z", "api": "a", "score": 0.5, "valid_until": 10},
        {"endpoint_id": "b", "api": "a", "score": 0.9, "valid_until": 10},
        {"endpoint_id": "c", "api": "a", "score": 0.5, "valid_until": 10},
        {"endpoint_id": "d", "api": "a", "score": 1.0, "valid_until": 1},
        {"endpoint_id": "x", "api": "other", "score": 0.1, "valid_until": 10},
    ]
    assert prioritize(scores[:4]) == ["d", "b", "c", "z"]
    assert prioritize(list(reversed(scores[:4]))) == ["d", "b", "c", "z"]
    assert prioritize(scores[:4], now_ms=5) == ["b", "c", "z", "d"]  # stale goes last
    assert prioritize_by_api(scores) == {"a": ["d", "b", "c", "z"], "other": ["x"]}


def test_weights_relative_and_haproxy() -> None:
    w = routing_weights({"a": 0.5, "b": 0.25, "c": 0.0})
    assert w == {"a": 1.0, "b": 0.5, "c": 0.0}
    hw = haproxy_weights({"a": 0.5, "b": 0.25, "c": 0.0, "d": 1e-9})
    assert hw == {"a": 256, "b": 128, "c": 0, "d": 1}
    assert all(0 <= v <= 256 for v in hw.values())
    assert haproxy_weights({"a": 0.0, "b": 0.0}) == {"a": 256, "b": 256}  # never no routing


def _record(cap: float = 100.0, rps: float = 30.0, p99: float = 100.0, err: float = 0.0,
            anomaly: float = 0.0, mean: float | None = None) -> dict[str, Any]:
    return load_score_record(
        endpoint_id="e", api="a", region="r", computed_at=0.0, step_seconds=10,
        forecast=_fc(rps if mean is None else mean), capacity=CapacityEstimate(cap, "CONFIGURED"),
        current_rps=rps, latency_p99_ms=p99, error_rate=err, anomaly_score=anomaly)


def test_split_score_takes_the_own_load_out_of_a_score() -> None:
    # the scorer's own records: health is what was measured, nothing is left unexplained,
    # however close to (or past) capacity the endpoint's own share of the traffic is
    for rps in (0.0, 30.0, 80.0, 99.0, 150.0):
        for p99, err, anomaly in ((100.0, 0.0, 0.0), (2000.0, 0.0, 0.0), (100.0, 0.05, 0.6)):
            rec = _record(rps=rps, p99=p99, err=err, anomaly=anomaly)
            parts = split_score(rec)
            want = min(1.0, 500.0 / p99) * np.exp(-err / 0.05) * (1 - 0.5 * anomaly)
            assert parts.health == pytest.approx(want)
            assert parts.explicit == pytest.approx(1.0)
            assert parts.capacity_rps == 100.0 and parts.capacity_source == "CONFIGURED"
    # next-step and peak demand, in rps
    rising = load_score_record(
        endpoint_id="e", api="a", region="r", computed_at=0.0, step_seconds=10,
        forecast=[ForecastPoint(h, 10.0 * h, 40.0 + 10 * h, 0.0, 60.0 + 10 * h)
                  for h in (1, 2, 3)],
        capacity=CapacityEstimate(100.0, "LEARNED"), current_rps=45.0, latency_p99_ms=50.0,
        error_rate=0.0)
    p = split_score(rising)
    assert (p.next_demand_rps, p.demand_rps) == (pytest.approx(50.0), pytest.approx(70.0))
    # a hand-set score (an operator, a test) says more than load and health: kept as is
    hand = {"endpoint_id": "e", "score": 0.25, "predicted_utilization": 0.0}
    assert split_score(hand).explicit == pytest.approx(0.25)
    assert split_score(hand).demand_rps is None
    assert split_score({**hand, "score": 0.0}).explicit == 0.0


def test_capacity_weights_follow_capacity_and_never_zero_a_live_endpoint() -> None:
    w = capacity_weights({"a": 300.0, "b": 100.0, "c": 100.0}, dict.fromkeys("abc", 1.0))
    assert w == pytest.approx({"a": 1.0, "b": 1 / 3, "c": 1 / 3})
    sick = capacity_weights({"a": 100.0, "b": 100.0}, {"a": 1.0, "b": 1e-12})
    assert sick["b"] == pytest.approx(0.05)  # floored: a trickle shows when it recovers
    assert capacity_weights({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, {"b": 0.0})["b"] == 0
    assert haproxy_weights({"a": 110.0, "b": 37.0}) == {"a": 256, "b": 86}  # rps are fine


def test_limit_change_is_bounded_both_ways() -> None:
    for prev, target in itertools.product((0.5, 10.0, 300.0), (0.01, 1.0, 9.0, 1000.0)):
        got = limit_change(prev, target, 2.0)
        assert prev / 2.0 <= got <= prev * 2.0
        assert (got - prev) * (target - prev) >= 0  # towards the target, never past it
        assert abs(got - target) <= abs(prev - target)
    assert limit_change(5.0, 0.0, 2.0) == 0.0 and limit_change(0.0, 5.0, 2.0) == 5.0
