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

LightGBM is imported when a fit runs, not on import.  A refit is two parts so a worker
can fit off its event loop: :meth:`GlobalTreeTrainer.take` copies the pool (quick, where
the rows arrive) and the :class:`TreeFit` it returns fits in any thread (LightGBM releases
the GIL); :class:`SharedTrees` is a worker's trainer and the trees its forecasters share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from processors.forecasting.direct import DirectForecaster
from processors.forecasting.features import F_LONG_SEASON, N_TREE_FEATURES, tree_features
from processors.forecasting.trees import TreeEnsemble

__all__ = ["GLOBAL_TREES", "TREE_PARAMS", "GlobalTreeTrainer", "SharedTrees", "TreeFit",
           "direct_of"]

#: LightGBM parameters of the global trees (L1: the blend and MASE score absolute error;
#: depth bounded so a walk is ``max_depth`` steps; one thread, deterministic).  Rate 0.05
#: over 200 rounds with leaves of 20 rows, as the LightGBM anchor of
#: benchmarks/forecast_accuracy.py: NYC taxi h = 15 0.488 against 0.494 with rate 0.1,
#: 100 rounds, leaves of 50 (picked on the benchmark's two traces: in-sample there).
TREE_PARAMS: dict[str, Any] = {
    "objective": "l1", "learning_rate": 0.05, "num_leaves": 31, "max_depth": 6,
    "min_data_in_leaf": 20, "feature_fraction": 0.9, "num_threads": 1, "seed": 0,
    "deterministic": True, "force_row_wise": True, "verbose": -1,
}

#: Defaults of :meth:`GlobalTreeTrainer.for_forecaster`: refit weekly (data time; daily
#: refits were no better on NYC taxi: 0.510 against 0.505 at h = 15) on the newest 60,000
#: rows, 200 rounds, the trees fitted to the target's offset from the week-old value
#: (the long-season naive minus the base; 0 without a week of history).
GLOBAL_TREES: dict[str, Any] = {
    "max_rows": 60_000, "refit_seconds": 7 * 86400.0, "rounds": 200,
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
        fit = self.take(ts)
        if fit is None:
            return None
        return self.adopt(fit())

    def take(self, ts: float) -> TreeFit | None:
        """The pooled rows (copied, oldest first) to fit the next version from, and the
        next refit scheduled ``refit_seconds`` after data time ``ts``; None with fewer than
        ``min_rows`` rows.  Fit with the returned :class:`TreeFit` (any thread: it shares
        nothing with the trainer), then :meth:`adopt` the result."""
        if self._n < self.min_rows:
            return None
        order = (self._pos - self._n + np.arange(self._n)) % self.max_rows
        self._next_fit = float(ts) + self.refit_seconds
        return TreeFit(self._X[order], self._y[order], dict(self.params), self.rounds,
                       self.version + 1, self.offset_feature)

    def adopt(self, model: TreeEnsemble) -> TreeEnsemble:
        """Make ``model`` (fitted from :meth:`take`) the current one; returns it."""
        self.version = max(self.version, model.version)
        self.model = model
        return model

    @property
    def next_fit(self) -> float | None:
        """Data time of the next refit (None: as soon as ``min_rows`` rows are pooled)."""
        return self._next_fit

    def resume(self, version: int, next_fit: float | None) -> None:
        """After a restart: number later fits above ``version`` and refit no sooner than
        ``next_fit`` (the schedule the restored trees were fitted on)."""
        self.version = max(self.version, int(version))
        if next_fit is not None and (self._next_fit is None or next_fit > self._next_fit):
            self._next_fit = float(next_fit)


@dataclass(frozen=True)
class TreeFit:
    """One refit's input, detached from the trainer: calling it fits and exports the
    trees (seconds on a full pool; LightGBM releases the GIL while it trains)."""

    X: np.ndarray
    y: np.ndarray
    params: dict[str, Any]
    rounds: int
    version: int
    offset_feature: int | None

    @property
    def rows(self) -> int:
        return len(self.y)

    def __call__(self) -> TreeEnsemble:
        import lightgbm as lgb  # heavy; only where a fit runs

        data = lgb.Dataset(self.X, self.y, params={"verbose": -1, "max_bin": 63})
        booster = lgb.train(self.params, data, num_boost_round=self.rounds)
        return TreeEnsemble.from_lightgbm(booster.dump_model(), self.version,
                                          offset_feature=self.offset_feature)


def direct_of(forecaster: Any) -> DirectForecaster | None:
    """The default forecaster inside ``forecaster`` (itself, or the one a warm start
    wraps); None for other kinds."""
    inner = forecaster.__dict__.get("inner", forecaster)
    return inner if isinstance(inner, DirectForecaster) else None


class SharedTrees:
    """A worker's global trees: one :class:`GlobalTreeTrainer` observing every default
    forecaster it holds, and the newest trees, which new endpoints start with.

    Plain bookkeeping, no threads: the caller tracks data time (:meth:`saw`), asks
    :meth:`due`, runs the :class:`TreeFit` of :meth:`take` where it likes (one at a
    time) and hands the result to :meth:`fitted`, then to every forecaster.
    ``options`` override :data:`GLOBAL_TREES`; ``keep_every`` 0 thins the pooled rows
    by the number of endpoints (:meth:`thin`) so the pool spans about a week of data.
    """

    def __init__(self, **options: Any) -> None:
        self.options = {**GLOBAL_TREES, **options}
        self.auto_thin = not self.options.get("keep_every")
        if self.auto_thin:
            self.options.pop("keep_every", None)
        self.trainer: GlobalTreeTrainer | None = None
        self.current: TreeEnsemble | None = None
        self.data_ts = -math.inf
        self.fitting = False
        self.refits = 0
        self._resume: tuple[int, float | None] = (0, None)
        self._horizon = 15

    def attach(self, forecaster: Any, model: TreeEnsemble | None) -> bool:
        """Pool ``forecaster``'s rows and have it use ``model``; False (nothing done) for
        a forecaster of another kind or other periods than the trainer's."""
        f = direct_of(forecaster)
        if f is None:
            return False
        if self.trainer is None:
            self.trainer = GlobalTreeTrainer.for_forecaster(f, **self.options)
            self.trainer.resume(*self._resume)
            self._horizon = f.max_horizon
        if f.tree_periods != (self.trainer.day_steps, self.trainer.week_steps):
            return False
        f.observe_rows(self.trainer)
        f.set_global_model(model)
        return True

    def saw(self, ts: float) -> None:
        """A step up to data time ``ts`` (epoch seconds) was learned."""
        if ts > self.data_ts:
            self.data_ts = ts

    def thin(self, endpoints: int) -> None:
        """Keep one learning batch in ``k`` so ``max_rows`` spans about a week of steps of
        ``endpoints`` endpoints (``k`` coprime with it: batches arrive round the endpoints,
        and a common factor would keep some endpoints' rows only)."""
        t = self.trainer
        if t is None or not self.auto_thin:
            return
        endpoints = max(endpoints, 1)
        k = max(1, math.ceil(self._horizon * endpoints * t.week_steps / t.max_rows))
        while k > 1 and math.gcd(k, endpoints) != 1:
            k += 1
        t.keep_every = k

    def due(self) -> bool:
        """Whether a refit should start now (none running, the trainer says so)."""
        return (not self.fitting and self.trainer is not None
                and self.trainer.due(self.data_ts))

    def take(self) -> TreeFit | None:
        """Start a refit (see :meth:`GlobalTreeTrainer.take`); None if there is nothing
        to fit.  Until :meth:`fitted` or :meth:`failed`, :meth:`due` says no."""
        if self.fitting or self.trainer is None:
            return None
        fit = self.trainer.take(self.data_ts)
        self.fitting = fit is not None
        return fit

    def fitted(self, model: TreeEnsemble) -> TreeEnsemble:
        """The refit started by :meth:`take` ended with ``model``: it is current (under a
        higher version if restored trees took its number meanwhile); returns it."""
        self.fitting = False
        self.refits += 1
        if model.version <= self.version:
            model = model.with_version(self.version + 1)
        return self._make_current(model)

    def renumber(self, model: TreeEnsemble) -> TreeEnsemble:
        """``model`` under a version above every one seen (restored trees of another
        worker carry its number); the current trees if it was them."""
        fresh = model.with_version(self.version + 1)
        if model is self.current:
            return self._make_current(fresh)
        if self.trainer is not None:
            self.trainer.version = max(self.trainer.version, fresh.version)
        self._resume = (max(self._resume[0], fresh.version), self._resume[1])
        return fresh

    def _make_current(self, model: TreeEnsemble) -> TreeEnsemble:
        if self.trainer is not None:
            self.trainer.adopt(model)
        else:
            self._resume = (max(self._resume[0], model.version), self._resume[1])
        self.current = model
        return model

    def failed(self) -> None:
        """The refit started by :meth:`take` failed (the next one at its usual time)."""
        self.fitting = False

    def restored(self, model: TreeEnsemble, next_fit: float | None) -> None:
        """Trees read back from a snapshot: later fits are numbered above them and keep
        their schedule; the newest restored trees are what new endpoints start with when
        the worker has none newer."""
        if self.trainer is not None:
            self.trainer.resume(model.version, next_fit)
        v, nf = self._resume
        if next_fit is not None and (nf is None or next_fit > nf):
            nf = next_fit
        self._resume = (max(v, model.version), nf)
        if self.current is None or model.version > self.current.version:
            self.current = model

    @property
    def next_fit(self) -> float | None:
        return None if self.trainer is None else self.trainer.next_fit

    @property
    def version(self) -> int:
        """The highest version fitted or restored (the next fit is numbered above it)."""
        t = self.trainer.version if self.trainer is not None else 0
        return max(t, self._resume[0])
