"""The global trees: export and walk, the blend candidate, snapshots, shifted series."""

from __future__ import annotations

import math
import pickle
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest

from processors.forecasting import make_forecaster
from processors.forecasting.direct import DirectForecaster
from processors.forecasting.features import K_GLOBAL, N_TREE_FEATURES
from processors.forecasting.global_trees import GlobalTreeTrainer
from processors.forecasting.trees import TreeEnsemble

_DAY = 24  # hourly steps
_H = 15


def test_tree_walk_is_lightgbms_prediction() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 6))
    y = np.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2] + 0.1 * rng.normal(size=3000)
    params = {"objective": "l1", "num_leaves": 15, "max_depth": 5, "num_threads": 1,
              "verbose": -1, "deterministic": True, "seed": 0}
    booster = lgb.train(params, lgb.Dataset(X, y), num_boost_round=40)
    t = TreeEnsemble.from_lightgbm(booster.dump_model(), version=3)
    Xt = rng.normal(size=(200, 6))
    np.testing.assert_allclose(t.predict(Xt), booster.predict(Xt), rtol=0, atol=1e-12)
    assert (t.version, t.n_trees, t.depth) == (3, 40, 5)
    assert 0 < t.nbytes < 200_000
    with pytest.raises(ValueError, match="features"):
        t.predict(Xt[:, :5])


def _weekly_series(days: int, level: float, seed: int, holiday: int | None = None,
                   phase: float = 0.0, weekend: float = 0.6) -> np.ndarray:
    """Hourly demand with a daily wave and weekends at ``weekend`` times the weekdays, 5 %
    noise; ``holiday``: the first day of a week at 35 % of the usual level."""
    rng = np.random.default_rng(seed)
    t = np.arange(days * _DAY)
    y = level * (1 + 0.6 * np.sin(2 * np.pi * t / _DAY + phase))
    y *= np.where((t // _DAY) % 7 >= 5, weekend, 1.0)
    if holiday is not None:
        d = t // _DAY
        y *= np.where((d >= holiday) & (d < holiday + 7), 0.35, 1.0)
    return np.clip(y * (1 + rng.normal(0, 0.05, t.size)), 0, None)


def _hourly() -> DirectForecaster:
    f = make_forecaster("default", step_seconds=3600, season_seconds=86400, max_horizon=_H)
    assert isinstance(f, DirectForecaster)
    return f


def _trained_trees(y: np.ndarray, rounds: int = 60) -> TreeEnsemble:
    """Global trees fitted once on the rows of one forecaster run over ``y``."""
    f = _hourly()
    trainer = GlobalTreeTrainer(*f.tree_periods, min_rows=500, rounds=rounds)
    f.observe_rows(trainer)
    for i, v in enumerate(y):
        f.learn(3600.0 * i, float(v))
    model = trainer.refit(3600.0 * len(y))
    assert model is not None and model.version == 1
    return model


def _run(f: DirectForecaster, y: np.ndarray, start: int, end: int | None = None,
         on_step: Any = None) -> dict[str, list[float]]:
    """Learn-then-forecast over hourly ``y``: MASE at h = 1, 5, 15 on targets in
    [start, end) of the final forecast and of the global-trees candidate alone, scaled by
    the one-day-back naive error of the whole series."""
    n = len(y)
    pred = np.full((n, _H), np.nan)
    cand = np.full((n, _H), np.nan)
    for i in range(n):
        f.learn(3600.0 * i, float(y[i]))
        for p in f.forecast(_H):
            if i + p.horizon < n:
                pred[i + p.horizon, p.horizon - 1] = p.mean
        g = f._pC[f._t % _H][:, K_GLOBAL]  # this step's candidates
        for h in range(1, _H + 1):
            if i + h < n:
                cand[i + h, h - 1] = g[h - 1]
        if on_step is not None:
            on_step(i, f)
    scale = float(np.mean(np.abs(y[_DAY:] - y[:-_DAY])))
    sl = slice(start, end)
    return {name: [float(np.mean(np.abs(y[sl] - a[sl, h - 1]))) / scale for h in (1, 5, 15)]
            for name, a in (("blend", pred), ("global", cand))}


def test_blend_falls_back_from_wrong_global_trees_on_a_ten_times_larger_endpoint() -> None:
    """Trees fitted on another endpoint (growing 3 % a day, another daily phase, busier
    weekends) are the global model of a new endpoint ten times larger with quiet
    weekends: the trees' candidate alone is off; the blend ends near the best baseline or
    better."""
    other = (_weekly_series(28, 100.0, seed=2, weekend=1.6)
             * np.repeat(1.03 ** np.arange(28), _DAY))
    wrong = _trained_trees(other)
    y = _weekly_series(21, 1000.0, seed=3, phase=2.0)
    f = _hourly()
    f.set_global_model(wrong)
    res = _run(f, y, 7 * _DAY)
    base = {}
    for kind in ("seasonal_naive", "persistence"):
        b = make_forecaster(kind, step_seconds=3600, season_seconds=86400)
        base[kind] = _run_plain(b, y, 7 * _DAY)
    for i in range(3):
        best = min(base["seasonal_naive"][i], base["persistence"][i])
        assert res["blend"][i] <= 1.05 * best, (res, base)
        assert res["blend"][i] <= 0.8 * res["global"][i], (res, base)


def _run_plain(f: Any, y: np.ndarray, start: int) -> list[float]:
    n = len(y)
    pred = np.full((n, _H), np.nan)
    for i in range(n):
        f.learn(3600.0 * i, float(y[i]))
        for p in f.forecast(_H):
            if i + p.horizon < n:
                pred[i + p.horizon, p.horizon - 1] = p.mean
    scale = float(np.mean(np.abs(y[_DAY:] - y[:-_DAY])))
    return [float(np.mean(np.abs(y[start:] - pred[start:, h - 1]))) / scale for h in (1, 5, 15)]


def test_blend_drops_the_global_trees_in_a_holiday_week() -> None:
    """Trees fitted on four ordinary weeks of this endpoint are a heavy component before
    a holiday week at 35 % and wrong in it: the blend's weight on them falls, and in the
    holiday week the blend is clearly better than the trees alone."""
    y = _weekly_series(42, 100.0, seed=1, holiday=28)
    model = _trained_trees(y[: 28 * _DAY])
    weights: dict[int, np.ndarray] = {}

    def keep(i: int, f: DirectForecaster) -> None:
        if i == 14 * _DAY:
            f.set_global_model(model)  # as a worker's refit would hand it over
        if i in (28 * _DAY - 1, 31 * _DAY - 1):
            weights[i] = f._mixw[:, K_GLOBAL].copy()

    res = _run(_hourly(), y, 28 * _DAY, 35 * _DAY, on_step=keep)
    before, during = weights[28 * _DAY - 1], weights[31 * _DAY - 1]
    assert before.max() > 0.2, weights  # in use before the holiday
    assert during.mean() < 0.5 * before.mean(), weights  # long horizons learn slower
    for i in range(3):
        assert res["blend"][i] <= 0.85 * res["global"][i], res


def test_global_trees_travel_by_version_and_snapshots_stay_bit_exact() -> None:
    """A snapshot holds the trees' version, not the trees; with the same trees set again
    after loading, forecasts continue bit for bit."""
    y = _weekly_series(21, 50.0, seed=4)
    model = _trained_trees(y[: 14 * _DAY], rounds=20)
    f = _hourly()
    for i in range(14 * _DAY):
        f.learn(3600.0 * i, float(y[i]))
    f.set_global_model(model)
    for i in range(14 * _DAY, 15 * _DAY):
        f.learn(3600.0 * i, float(y[i]))
    blob = pickle.dumps(f)
    assert len(blob) < len(pickle.dumps(model._value)) + 250_000
    g = pickle.loads(blob)
    assert g.global_version == 1 and g._global is None
    g.set_global_model(model)
    for i in range(15 * _DAY, 17 * _DAY):
        a, b = f.learn(3600.0 * i, float(y[i])), g.learn(3600.0 * i, float(y[i]))
        assert a == b
        assert f.forecast(_H) == g.forecast(_H)
    assert np.isfinite(f._pC[f._t % _H][:, K_GLOBAL]).all()


def test_snapshot_from_before_the_global_candidate_loads() -> None:
    """A forecaster pickled with one candidate fewer loads with the new column empty and
    forecasts as before (but for the fixed share spread over one candidate more)."""
    y = _weekly_series(10, 80.0, seed=5)
    f = _hourly()
    for i in range(9 * _DAY):
        f.learn(3600.0 * i, float(y[i]))
    old = pickle.loads(pickle.dumps(f.__getstate__()))  # a copy, no shared arrays
    for key in ("_cerr", "_cerr_num", "_cerr_w", "_cerr_n", "_mixw", "_pC"):
        old[key] = old[key][..., :K_GLOBAL].copy()
    old["_mixw"] /= old["_mixw"].sum(axis=1, keepdims=True)
    g = DirectForecaster.__new__(DirectForecaster)
    g.__setstate__(old)
    assert g._mixw.shape == f._mixw.shape and g._pC.shape == f._pC.shape
    for i in range(9 * _DAY, 10 * _DAY):
        f.learn(3600.0 * i, float(y[i]))
        g.learn(3600.0 * i, float(y[i]))
        for p, q in zip(f.forecast(_H), g.forecast(_H), strict=True):
            assert p.mean == pytest.approx(q.mean, rel=1e-4)  # the share: a / 9, not a / 8


def test_trainer_keeps_a_bounded_ring_and_checks_its_options() -> None:
    f = _hourly()
    trainer = GlobalTreeTrainer(*f.tree_periods, max_rows=300, min_rows=200, rounds=5)
    f.observe_rows(trainer)
    y = _weekly_series(4, 10.0, seed=6)
    assert not trainer.due(0.0)
    for i, v in enumerate(y):
        f.learn(3600.0 * i, float(v))
    assert trainer.rows_held == 300  # first-season rows are not kept; the ring is full
    assert trainer._X.shape == (300, N_TREE_FEATURES)
    assert trainer.due(3600.0 * len(y))
    assert trainer.refit(3600.0 * len(y)) is not None
    assert not trainer.due(3600.0 * len(y) + 1.0)  # next one a refit period later
    with pytest.raises(ValueError, match="max_rows"):
        GlobalTreeTrainer(24.0, 168.0, max_rows=0)
    with pytest.raises(ValueError, match="features"):
        f.set_global_model(TreeEnsemble.from_nodes([1.0], n_features=3, version=1))


def test_a_worker_thins_the_pooled_rows_by_its_endpoints() -> None:
    from processors.forecasting.global_trees import SharedTrees

    f = DirectForecaster(step_seconds=60, max_horizon=15)
    trees = SharedTrees()
    assert trees.attach(f, None) and trees.trainer is not None
    trees.thin(0)  # no endpoint yet
    assert trees.trainer.keep_every == 3  # 15 rows x 10,080 steps a week / 60,000 rows
    trees.thin(100)
    k = trees.trainer.keep_every
    assert k >= 15 * 100 * 10080 / 60000 and math.gcd(k, 100) == 1
    fixed = SharedTrees(keep_every=4)
    fixed.attach(DirectForecaster(step_seconds=60, max_horizon=15), None)
    fixed.thin(100)
    assert fixed.trainer is not None and fixed.trainer.keep_every == 4
