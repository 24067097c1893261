"""Federated averaging logic on real traces: FedAvg, clipping/robust rules, warm start."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from benchmarks.federated import EDGES, federate, frozen_mae, split
from benchmarks.forecast_accuracy import load_series
from processors.federated.aggregation import AggregationConfig, aggregate
from processors.federated.coldstart import ColdStartForecaster, warm_start
from processors.federated.params import family_of, load_weights, shared_view
from processors.federated.rounds import RoundCoordinator
from processors.federated.statistics import RowStats, solve_weights
from processors.forecasting.direct import DirectForecaster
from processors.forecasting.features import N_FEATURES
from schemas.codec import Codec
from schemas.federated import (
    GlobalState,
    ModelDelta,
    global_from_record,
    global_to_record,
    update_from_record,
    update_to_record,
)
from streams.edge.federated import EdgeTrainingConfig, LocalTrainer
from tests.conftest import ELB


def _delta(edge: str, value: float, n: int = 10, base: int = 0, rnd: int = 1) -> ModelDelta:
    return ModelDelta(edge, "f", rnd, base, n, {"weights": np.full((2, 3), value)})


def _base(version: int = 0) -> GlobalState:
    return GlobalState("f", version, {"weights": np.zeros((2, 3))})


NO_CLIP = AggregationConfig(clip_median_multiple=None)


def test_fedavg_is_weighted_by_samples() -> None:
    out = aggregate(_base(), [_delta("a", 1.0, 30), _delta("b", 5.0, 10)], NO_CLIP).state
    assert out.version == 1 and out.participants == ["a", "b"] and out.num_samples == 40
    assert np.allclose(out.params["weights"], 2.0)


def test_stale_updates_are_down_weighted_then_rejected() -> None:
    cfg = AggregationConfig(clip_median_multiple=None, max_staleness=1, staleness_decay=0.5)
    ups = [_delta("fresh", 1.0, base=3), _delta("late", 4.0, base=2), _delta("old", 9.0, base=1)]
    res = aggregate(_base(3), ups, cfg)
    # fresh weight 10, late weight 10 * 0.5: (1 * 10 + 4 * 5) / 15 = 2
    assert np.allclose(res.state.params["weights"], 2.0)
    assert set(res.rejected) == {"old"} and "stale" in res.rejected["old"]


def test_bad_updates_are_rejected_not_averaged() -> None:
    nan = _delta("nan", 1.0)
    nan.delta["weights"][0, 0] = math.nan
    shape = ModelDelta("shape", "f", 1, 0, 10, {"weights": np.ones((3, 3))})
    res = aggregate(_base(), [_delta("ok", 1.0), nan, shape], NO_CLIP)
    assert set(res.rejected) == {"nan", "shape"}
    assert np.allclose(res.state.params["weights"], 1.0)


def test_clipping_and_robust_rules_bound_one_huge_update() -> None:
    ups = [_delta(e, 1.0) for e in "abc"] + [_delta("evil", 1e6)]
    assert aggregate(_base(), ups, NO_CLIP).state.params["weights"].max() > 1e5
    clipped = aggregate(_base(), ups, AggregationConfig()).state.params["weights"]
    assert clipped.max() < 2.0  # at most 3 x the median norm, a quarter of the weight
    for method in ("median", "trimmed-mean"):
        robust = aggregate(_base(), ups, AggregationConfig(method=method)).state
        assert np.allclose(robust.params["weights"], 1.0), method


def test_noise_is_calibrated_to_the_clip_bound() -> None:
    with pytest.raises(ValueError, match="clip_norm"):
        AggregationConfig(noise_multiplier=1.0)
    cfg = AggregationConfig(clip_norm=1.0, clip_median_multiple=None, noise_multiplier=1.0,
                            seed=1)
    ups = [_delta(e, 0.0) for e in "abcd"]
    out = aggregate(_base(), ups, cfg).state
    # sigma = 1.0 * bound 1.0 * max share 1/4
    assert out.metrics["noise_std.weights"] == pytest.approx(0.25)
    assert 0.05 < float(np.std(out.params["weights"])) < 0.6


def test_noise_on_statistics_is_symmetric_and_calibrated() -> None:
    edges, central, _ = _edge_forecasters(4)
    base = GlobalState("f", 0, {"gram": np.zeros_like(central.sums["gram"])})
    ups = [ModelDelta(f"e{k}", "f", 1, 0, 100, st.take(), {n: st.count(n) for n in st.sums})
           for k, st in enumerate(edges)]
    cfg = AggregationConfig(clip_norm=0.5, clip_median_multiple=None, noise_multiplier=1.0,
                            seed=3)
    g = aggregate(base, ups, cfg).state
    share = max(st.count("gram") for st in edges) / central.count("gram")
    assert g.metrics["noise_std.gram"] == pytest.approx(0.5 * share, rel=0.05)
    noisy = g.params["gram"]
    assert np.allclose(noisy, np.swapaxes(noisy, 1, 2)) and not np.allclose(
        noisy, central.sums["gram"])


def test_rounds_close_on_count_or_deadline_and_ignore_future_rounds() -> None:
    c = RoundCoordinator(NO_CLIP, min_updates=3, round_timeout=30)
    assert c.offer(_delta("a", 1.0), now=0) == []
    assert c.offer(_delta("a", 3.0), now=1) == []  # re-sent: replaces, still one edge
    assert c.offer(_delta("b", 3.0, rnd=5), now=2) == []  # a future round: rejected
    assert c.due(now=29) == []
    (v1,) = c.due(now=31)
    assert v1.version == 1 and v1.participants == ["a"]
    assert np.allclose(v1.params["weights"], 3.0)
    assert any("round 5" in reason for _, reason in c.rejected)
    # A late re-send of a round that already counted this edge is not counted again.
    assert c.offer(_delta("a", 9.0), now=40) == []
    assert "already includes" in c.rejected[-1][1] and c.pending("f") == 0


def test_sgd_weights_are_averaged_on_raw_features_with_merged_scalers() -> None:
    """Two SGD edges with different scalers: the global predicts like their raw mean."""
    ts, y = load_series(ELB, 1200)
    fs = []
    for lo, hi in ((0, 600), (600, 1200)):
        f = DirectForecaster(300, max_horizon=5, learner="sgd")
        for i in range(lo, hi):
            f.learn(float(ts[i]), float(y[i]))
        fs.append(f)
    views = [shared_view(f) for f in fs]
    assert not np.allclose(views[0][1]["x_mean"], views[1][1]["x_mean"])
    # Round trip: an edge's own raw view, reloaded with its own scaler, is its model.
    w_before = fs[0].weights.copy()
    load_weights(fs[0], views[0][0], views[0][1])
    assert np.allclose(fs[0].weights, w_before)
    base = GlobalState(family_of(fs[0]), 0, {"weights": np.zeros_like(views[0][0])})
    ups = [ModelDelta(f"e{i}", base.family, 1, 0, 600, {"weights": v[0]}, stats=v[1])
           for i, v in enumerate(views)]
    g = aggregate(base, ups, NO_CLIP).state
    assert np.allclose(g.params["weights"], (views[0][0] + views[1][0]) / 2)
    assert set(g.stats) == {"x_mean", "x_var", "y_var"}
    x0 = np.asarray(np.random.default_rng(0).normal(size=views[0][0].shape[1]))
    x0[0] = 1.0
    f = DirectForecaster(300, max_horizon=5, learner="sgd")
    load_weights(f, g.params["weights"], g.stats)
    # The loaded model (standardized with the merged scaler) predicts the raw-mean output.
    mu, sd = f._x_mean, np.sqrt(f._x_var)
    xs = (x0 - mu) / sd
    xs[:, 0] = 1.0
    pred = (xs * f.weights).sum(axis=1) * np.sqrt(f._y_var)
    assert np.allclose(pred, g.params["weights"] @ x0)


def _flip_targets(u: ModelDelta) -> ModelDelta:
    """A poisoned edge that claims the targets were -1000 x what they were: plausible
    counts and features, the solution pulled far off."""
    F = N_FEATURES
    for S in u.delta.values():
        S[:, :F, F] *= -1000.0
        S[:, F, :F] *= -1000.0
        S[:, F, F] *= 1e6
    return u


def test_poisoned_edge_is_contained_on_real_data() -> None:
    """One edge poisons its statistics every round: clipping and the median keep the global
    model within 10 % of the clean run's test MAE; plain FedAvg (no defence) does not."""
    ts, y = load_series(ELB)
    step, m = 300, 288
    test_start = int(len(y) * 0.8)
    parts = [(ts[ix], y[ix]) for ix in split(test_start, "time", m)]
    assert len(parts) == EDGES
    cfg = EdgeTrainingConfig(step_seconds=step, horizon=15, cold_shadows=False)
    clean, _ = federate(parts, cfg, 3, AggregationConfig())
    runs = {"clean": clean}
    for attack_name, attack in (("x-1000", None), ("flip", _flip_targets)):
        kw = {} if attack is None else {"attack": attack}
        for name, agg in (("clip", AggregationConfig()),
                          ("median", AggregationConfig(method="median")),
                          ("naive", NO_CLIP)):
            runs[f"{attack_name}.{name}"], _ = federate(parts, cfg, 3, agg, poison=True, **kw)
    mae = {}
    for k, st in runs.items():
        assert st is not None
        mae[k] = frozen_mae(st.params["weights"], ts, y, test_start, step)
    for k in ("x-1000.clip", "x-1000.median", "flip.clip", "flip.median"):
        assert mae[k] <= 1.10 * mae["clean"], (k, mae)
    assert mae["flip.naive"] > 1.5 * mae["clean"], mae
    assert mae["x-1000.naive"] > 1.1 * mae["clean"], mae


def _edge_forecasters(n_edges: int = 3) -> tuple[list[RowStats], RowStats, list[tuple]]:
    """Disjoint blocks of the ELB trace at ``n_edges`` edges; one RowStats per edge, one for
    all (central), and every row (h, x, target) recorded."""
    ts, y = load_series(ELB, 1800)
    central = RowStats(5, ("gram", "cold_gram"))
    rows: list[tuple] = []

    class Both:
        def __init__(self, own: RowStats) -> None:
            self.own = own

        def rows(self, hi, X, tgt, missing, seasonal):  # type: ignore[no-untyped-def]
            self.own.rows(hi, X, tgt, missing, seasonal)
            central.rows(hi, X, tgt, missing, seasonal)
            rows.extend((int(h), x.copy(), float(t)) for h, x, t, s in
                        zip(hi, X, tgt, seasonal, strict=True) if s)

    edges = []
    for ix in np.array_split(np.arange(len(y)), n_edges):
        own = RowStats(5, ("gram", "cold_gram"))
        f = DirectForecaster(300, max_horizon=5)
        f.observe_rows(Both(own))
        for i in ix:
            f.learn(float(ts[i]), float(y[i]))
        edges.append(own)
    return edges, central, rows


def test_summed_statistics_give_the_central_least_squares_solution() -> None:
    """Aggregating the edges' row statistics is exactly least squares on all their rows,
    however the rows are split; the clipped default changes nothing for honest edges."""
    edges, central, rows = _edge_forecasters()
    base = GlobalState("f", 0, {"gram": np.zeros_like(central.sums["gram"])})
    ups = [ModelDelta(f"e{k}", "f", 1, 0, 100, st.take(),
                      {n: st.count(n) for n in st.sums})
           for k, st in enumerate(edges)]
    for cfg in (NO_CLIP, AggregationConfig(ridge=0.0, clip_median_multiple=None)):
        g = aggregate(base, ups, cfg).state
        assert np.allclose(g.params["gram"], central.sums["gram"])
    g = aggregate(base, ups, AggregationConfig(ridge=0.0, clip_median_multiple=10.0)).state
    assert g.samples["weights"] == central.count("gram") > 500
    # Least squares on the pooled rows of horizon 1, directly.
    X = np.array([x for h, x, _ in rows if h == 0])
    t = np.array([v for h, _, v in rows if h == 0])
    used = np.abs(X).sum(axis=0) > 0  # features never seen are 0 (ridge pulls them there)
    w_ls, *_ = np.linalg.lstsq(X[:, used], t, rcond=None)
    assert np.allclose(g.params["weights"][0, used], w_ls, atol=1e-6)
    assert np.allclose(solve_weights(central.sums["gram"], 0.0), g.params["weights"])
    # And the cold-start weights from the first-season rows.
    assert np.any(g.params["cold_weights"])


def test_clipping_and_robust_rules_bound_poisoned_statistics() -> None:
    edges, central, _ = _edge_forecasters(4)
    base = GlobalState("f", 0, {"gram": np.zeros_like(central.sums["gram"])})

    def ups(poison: float, counts: float = 1.0) -> list[ModelDelta]:
        out = [ModelDelta(f"e{k}", "f", 1, 0, 100, st.take(),
                          {n: st.count(n) for n in st.sums}) for k, st in enumerate(edges)]
        u = out[-1]
        u.delta = {k: v.copy() for k, v in u.delta.items()}
        for S in u.delta.values():
            S[:, 1:, :] *= poison  # features and targets, not the count
            S[:, :, 1:] *= poison
            S *= counts
        return out

    clean = aggregate(base, ups(1.0), NO_CLIP).state.params["weights"]

    def err(w: np.ndarray) -> float:
        return float(np.abs(w - clean).max())

    for cfg in (AggregationConfig(), AggregationConfig(method="median"),
                AggregationConfig(method="trimmed-mean")):
        assert err(aggregate(base, ups(1.0), cfg).state.params["weights"]) < 1e-9
        # Bounded influence: 1000x more poison moves the global weights no further, far
        # less than it moves them without a defence.
        for small, big in (((30.0, 1.0), (30_000.0, 1.0)), ((1.0, 1e3), (1.0, 1e6)),
                           ((1.0, -1.0), (1.0, -1000.0))):
            e_small, e_big = (err(aggregate(base, ups(*p), cfg).state.params["weights"])
                              for p in (small, big))
            naive = err(aggregate(base, ups(*big), NO_CLIP).state.params["weights"])
            assert e_big < e_small + 0.05 and e_big < 0.25 * naive, (cfg.method, big, e_big,
                                                                      e_small, naive)


def test_warm_start_switches_to_global_weights_after_a_season() -> None:
    ts, y = load_series(ELB, 900)
    tr = LocalTrainer("e", EdgeTrainingConfig(step_seconds=300, horizon=15, min_samples=1))
    tr.observe({"endpoint_id": "x", "window_start": round(t * 1000),
                "window_end": round((t + 300) * 1000), "request_count": float(v)}
               for t, v in zip(ts, y, strict=True))
    u = tr.make_update(now=0)
    assert u is not None and u.samples["cold_gram"] >= 288  # a shadow lived a day
    g = aggregate(GlobalState(u.family, 0, {k: np.zeros_like(v) for k, v in u.delta.items()}),
                  [u], NO_CLIP).state
    f = warm_start(DirectForecaster(300, max_horizon=15), g)
    assert isinstance(f, ColdStartForecaster) and f.version == 1
    assert np.allclose(f.inner.weights, g.params["weights"] * 0 + g.params["cold_weights"])
    for i in range(288):
        f.learn(float(ts[i]), float(y[i]))
    assert f.graduated and np.allclose(f.inner.weights, g.params["weights"], atol=0.5)
    f2 = pickle.loads(pickle.dumps(f))
    assert f2.forecast(3) == f.forecast(3) and f2.observations == 288
    with pytest.raises(ValueError, match="new endpoints"):
        warm_start(f.inner, g)


def test_statistics_travel_as_counts_means_and_covariances(codec: Codec) -> None:
    """On the wire a horizon's statistics are a row count (not a value) with means and
    covariances; decoding restores the sums."""
    edges, _, _ = _edge_forecasters(2)
    st = edges[0]
    u = ModelDelta("a", "f", 1, 0, 100, st.take(), {n: st.count(n) for n in st.sums})
    rec = update_to_record(u, 1)
    grams = [p for p in rec["delta"] if p["name"].startswith("gram[")]
    assert len(grams) == 5 and grams[0]["num_samples"] == st.count("gram")
    assert grams[0]["shape"] == [N_FEATURES + 1, N_FEATURES]
    assert float(st.count("gram")) not in grams[0]["values"]
    back = update_from_record(codec.decode(codec.encode("ModelUpdate", rec), "ModelUpdate"))
    for name in ("gram", "cold_gram"):
        assert np.allclose(back.delta[name], st.sums[name], rtol=1e-9, atol=1e-6)
        assert back.samples[name] == st.count(name)


def test_records_round_trip_through_the_codec(codec: Codec) -> None:
    u = _delta("a", 0.5)
    u.samples = {"weights": 7}
    u.stats = {"cold_errors": np.array([[0.1, math.nan]])}
    back = update_from_record(codec.decode(codec.encode("ModelUpdate",
                                                        update_to_record(u, 1)), "ModelUpdate"))
    assert back.delta["weights"].shape == (2, 3) and back.samples == {"weights": 7}
    assert np.isnan(back.stats["cold_errors"][0, 1])
    g = aggregate(_base(), [u], NO_CLIP).state
    g2 = global_from_record(codec.decode(codec.encode("GlobalModel", global_to_record(g))))
    assert g2.version == 1 and np.allclose(g2.params["weights"], g.params["weights"])
