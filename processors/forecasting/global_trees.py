"""The global trees: one gradient-boosted model shared by every endpoint of a worker.

Per-endpoint linear models leave a gap where the signal is in interactions (the weekly
shape at one time of day, how a burst decays at one horizon).  Gradient-boosted trees
capture them, but are too costly to fit per endpoint.  So :class:`GlobalTreeTrainer` pools
the learning rows of many default forecasters (it is their ``RowObserver``), all
scale-free (features and target divided by each endpoint's level), and refits one
LightGBM model, horizon as a feature, every ``refit_seconds`` of data time on its newest
``max_rows`` rows.  The model is exported to a :class:`~processors.forecasting.trees.
TreeEnsemble` (arrays, no LightGBM object) with a new version number; each forecaster
applies it as one more candidate of its online blend (``set_global_model``), so an
endpoint whose series the trees do not fit (ten times larger is fine, scale-free; a
holiday week, another shape) simply gives that candidate little weight.

LightGBM is imported when a fit runs, not on import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from processors.forecasting.features import F_LONG_SEASON, N_TREE_FEATURES, tree_features
from processors.forecasting.trees import TreeEnsemble

__all__ = ["GLOBAL_TREES", "TREE_PARAMS", "GlobalTreeTrainer"]

#: LightGBM parameters of the global trees (L1: the blend and MASE score absolute error;
#: depth bounded so a walk is ``max_depth`` numpy steps; one thread, deterministic).
TREE_PARAMS: dict[str, Any] = {
    "objective": "l1", "learning_rate": 0.1, "num_leaves": 31, "max_depth": 6,
    "min_data_in_leaf": 50, "feature_fraction": 0.9, "num_threads": 1, "seed": 0,
    "deterministic": True, "force_row_wise": True, "verbose": -1,
}

#: Defaults of :meth:`GlobalTreeTrainer.for_forecaster`: refit weekly (data time; daily
#: refits were no better on NYC taxi: 0.510 against 0.505 at h = 15) on the newest 60,000
#: rows, 100 rounds, the trees fitted to the target's offset from the week-old value
#: (the long-season naive minus the base; 0 without a week of history).
GLOBAL_TREES: dict[str, Any] = {
    "max_rows": 60_000, "refit_seconds": 7 * 86400.0, "rounds": 100,
    "offset_feature": F_LONG_SEASON,
}


class GlobalTreeTrainer:
    """Pools scale-free learning rows of many forecasters and refits the global trees.

    Attach with ``forecaster.observe_rows(trainer)`` (one trainer observes every
    forecaster of a worker with the same step and season); call :meth:`due` with the
    data time as steps are learned and :meth:`refit` when it says so, then hand the new
    model to every forecaster (``set_global_model``).

    ``keep_every``: keep the rows of one step in that many (a worker with many endpoints
    thins them so ``max_rows`` covers weeks, not hours).  Rows of an endpoint's first
    season (base = level, not seasonal naive) are not kept.
    """

    def __init__(self, day_steps: float, week_steps: float, max_rows: int = 60_000,
                 refit_seconds: float = 86400.0, min_rows: int = 1000, rounds: int = 100,
                 keep_every: int = 1, params: dict[str, Any] | None = None,
                 offset_feature: int | None = None) -> None:
        if max_rows < 1 or min_rows < 1 or rounds < 1 or keep_every < 1:
            raise ValueError("max_rows, min_rows, rounds and keep_every must be >= 1")
        if not refit_seconds > 0:
            raise ValueError("refit_seconds must be > 0")
        self.day_steps, self.week_steps = float(day_steps), float(week_steps)
        self.max_rows, self.min_rows = int(max_rows), int(min_rows)
        self.refit_seconds, self.rounds = float(refit_seconds), int(rounds)
        self.keep_every = int(keep_every)
        self.params = dict(TREE_PARAMS if params is None else params)
        self.offset_feature = offset_feature
        self.version = 0
        self.model: TreeEnsemble | None = None
        self._X = np.zeros((self.max_rows, N_TREE_FEATURES))
        self._y = np.zeros(self.max_rows)
        self._pos = 0  # next slot of the ring
        self._n = 0  # rows held (<= max_rows)
        self._batches = 0
        self._next_fit: float | None = None

    @classmethod
    def for_forecaster(cls, forecaster: Any, **options: Any) -> GlobalTreeTrainer:
        """A trainer for forecasters with ``forecaster``'s step, season and week, with
        :data:`GLOBAL_TREES` defaults (``options`` override them)."""
        return cls(*forecaster.tree_periods, **{**GLOBAL_TREES, **options})

    @property
    def rows_held(self) -> int:
        """Rows in the pool (at most ``max_rows``)."""
        return self._n

    def rows(self, horizons: np.ndarray, X: np.ndarray, target: np.ndarray,
             missing: np.ndarray, seasonal: np.ndarray) -> None:
        """RowObserver hook (see ``DirectForecaster.observe_rows``)."""
        self._batches += 1
        if self._batches % self.keep_every:
            return
        keep = np.asarray(seasonal, dtype=bool)
        if not keep.any():
            return
        if not keep.all():
            horizons, X, target = horizons[keep], X[keep], target[keep]
        k = len(target)
        if k > self.max_rows:  # a batch larger than the ring: its newest rows
            cut = slice(k - self.max_rows, k)
            horizons, X, target, k = horizons[cut], X[cut], target[cut], self.max_rows
        slots = (self._pos + np.arange(k)) % self.max_rows
        self._X[slots] = tree_features(X, horizons + 1, self.day_steps, self.week_steps)
        off = self.offset_feature
        self._y[slots] = target if off is None else target - X[:, off]
        self._pos = int((self._pos + k) % self.max_rows)
        self._n = min(self._n + k, self.max_rows)

    def due(self, ts: float) -> bool:
        """Whether a refit is due at data time ``ts`` (epoch seconds): ``refit_seconds``
        after the last one (the first as soon as ``min_rows`` rows are pooled; refitting
        sooner while the pool doubled was no better on NYC taxi)."""
        if self._n < self.min_rows:
            return False
        return self._next_fit is None or ts >= self._next_fit

    def refit(self, ts: float) -> TreeEnsemble | None:
        """Fit the trees on the pooled rows (oldest first) and export them with the next
        version; None (and nothing changes) with fewer than ``min_rows`` rows."""
        if self._n < self.min_rows:
            return None
        import lightgbm as lgb  # heavy; only where a fit runs

        order = (self._pos - self._n + np.arange(self._n)) % self.max_rows
        data = lgb.Dataset(self._X[order], self._y[order],
                           params={"verbose": -1, "max_bin": 63})
        booster = lgb.train(self.params, data, num_boost_round=self.rounds)
        self.version += 1
        self.model = TreeEnsemble.from_lightgbm(booster.dump_model(), self.version,
                                                offset_feature=self.offset_feature)
        self._next_fit = float(ts) + self.refit_seconds
        return self.model
