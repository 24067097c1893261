"""Direct multi-horizon forecaster blended online with the baselines (``"default"``).

Why direct: River's stock forecasters are recursive (they feed their own 1-step forecast
back in), so errors compound with the horizon.  Here every horizon ``h = 1..H`` has its own
linear model that predicts, scale-free, how far the actual will be from the
seasonal-naive forecast:

    target_h(t) = (y[t+h] - base_h(t)) / s(t)
    base_h(t)   = y[t+h-m]                      (seasonal naive, m = steps per season)
    s(t)        = EW mean of y over ~one season (the current level)
    forecast    = base_h(t) + s(t) * w_h . x_h(t)

Features ``x_h(t)`` are all divided by ``s(t)`` so weights transfer between endpoints of
any size (what federated averaging needs): other candidate forecasts minus the base
(persistence, three EW means, the one-long-season-back value such as last week, the mean
of the same step over the last days), recent seasonal differences and their EW means,
the weekly difference, and Fourier terms of the time of day and of the week.

Learning is online, one update per horizon as each target becomes known ``h`` steps later.
Two learners are available: exponentially-forgetting recursive least squares (``"rls"``,
the default: converges in a few hundred steps, which matters on short series) and
standardized SGD with gradient clipping (``"sgd"``, per-horizon feature scaling).
Innovations are clipped at a few robust standard deviations so a single spike cannot
wreck the weights.

Final forecast (``select``).  ``"mix"``, the default: per horizon, a weighted mean of the
candidates (the model, seasonal naive, persistence, the EW means, the long-season naive,
the multi-season mean and, when a worker sets them, the global trees shared by its
endpoints -- see :mod:`processors.forecasting.global_trees` and :meth:`set_global_model`)
whose weights are learned online by exponentiated gradient on the blend's scale-free
absolute error (rate ``mix_lr / h ** mix_power``: horizon h learns from forecasts made h
steps ago), with a small fixed share of uniform weight so a candidate that was poor
can come back.  A candidate without a forecast (no week of history yet) keeps its weight
relative to the blend.  A guard forecasts seasonal naive or persistence instead while its
recent error (EW, half-life half a season) is below ``guard_margin`` times the blend's.
The rate and share were picked on the two traces in ``streams/traces`` -- the same ones
``benchmarks/forecast_accuracy.py`` reports, so those figures are in-sample for them.
``"best"`` (the previous default): the candidate with the smallest EW mean absolute error,
the model favoured by ``guard_margin``.  ``"model"``: the model alone.  ``"blend"``:
inverse-squared-error weights.  Bands are rolling empirical quantiles of the final
forecast's past errors (see :mod:`processors.forecasting.bands`).

The parts live in their own modules, as mixins that keep their state in the forecaster's
attributes (one object per endpoint, one pickle, no indirection on the per-step path):
:mod:`~processors.forecasting.features` (history and the design matrix),
:mod:`~processors.forecasting.learners` (the per-horizon RLS / SGD models) and
:mod:`~processors.forecasting.blend` (candidate errors and the final forecast).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from processors.forecasting.bands import BandedForecaster
from processors.forecasting.blend import (
    CANDIDATES,
    MIX_LR,
    MIX_POWER,
    MIX_SHARE,
    SELECTS,
    CandidateBlend,
)
from processors.forecasting.features import (
    FCLIP,
    K_GLOBAL,
    N_FEATURES,
    SeasonalFeatures,
)
from processors.forecasting.learners import LEARNERS, HorizonLearners
from processors.forecasting.trees import TreeEnsemble

__all__ = ["DirectForecaster", "RowObserver"]


class RowObserver(Protocol):
    """Receives the learning rows of a :class:`DirectForecaster` (see ``observe_rows``)."""

    def rows(self, horizons: np.ndarray, X: np.ndarray, target: np.ndarray,
             missing: np.ndarray, seasonal: np.ndarray) -> None: ...


class DirectForecaster(SeasonalFeatures, HorizonLearners, CandidateBlend, BandedForecaster):
    """Per-horizon online linear models on scale-free features, blended online with the
    baselines.

    >>> import math
    >>> f = DirectForecaster(step_seconds=3600, season_seconds=86400, max_horizon=3)
    >>> for i in range(24 * 10):
    ...     _ = f.learn(3600 * i, 100 + 50 * math.sin(2 * math.pi * i / 24))
    >>> pts = f.forecast(3)
    >>> [round(p.mean) for p in pts]
    [100, 113, 125]
    >>> all(p.lower <= p.mean <= p.upper for p in pts)
    True
    """

    kind = "default"
    #: Observer of learning rows (see :meth:`observe_rows`); None = off.  A class-level
    #: default so forecasters pickled before the hook existed load unchanged.
    _row_observer: RowObserver | None = None
    #: All history offsets of a step's features in one array (see _gather_offsets);
    #: derived, so not pickled.
    _gather: np.ndarray | None = None
    #: The shared global trees (see set_global_model); never pickled, only their version.
    _global: TreeEnsemble | None = None
    #: The trees' rows of this step (see _tree_rows); derived, not pickled.
    _tree_buf: np.ndarray | None = None
    #: Version of the global trees in use, 0 = none (snapshots record it).
    global_version: int = 0

    def __init__(
        self,
        step_seconds: int,
        season_seconds: int = 86400,
        max_horizon: int = 15,
        long_season_seconds: int | None = 7 * 86400,
        learner: str = "rls",
        forgetting: float = 0.999,
        lr: float = 0.01,
        error_halflife: int | None = None,
        select: str = "mix",
        max_history: int = 12_000,
        guard_margin: float = 0.9,
        mix_lr: float = MIX_LR,
        mix_share: float = MIX_SHARE,
        mix_power: float = MIX_POWER,
        guard_halflife: int | None = None,
    ) -> None:
        super().__init__(step_seconds, season_seconds, max_horizon)
        if learner not in LEARNERS:
            raise ValueError("learner must be 'rls' or 'sgd'")
        if select not in SELECTS:
            raise ValueError(f"select must be one of {', '.join(map(repr, SELECTS))}")
        if not (mix_lr >= 0 and math.isfinite(mix_lr)) or not 0 <= mix_share < 1:
            raise ValueError("mix_lr must be finite and >= 0, mix_share in [0, 1)")
        if not 0 <= mix_power <= 2:
            raise ValueError("mix_power must be in [0, 2]")
        H, F, C = self.max_horizon, N_FEATURES, len(CANDIDATES)
        self._init_history(step_seconds, long_season_seconds, max_history)
        self._init_learners(H, learner, forgetting, lr)
        # Pending (made at step k, row k % H): features, base, level, candidates.
        self._pX = np.zeros((H, H, F), dtype=np.float32)
        self._ps = np.full(H, np.nan)
        self._pbase = np.full((H, H), np.nan)  # = _pC[..., 1], for older versions' snapshots
        self._pC = np.full((H, H, C), np.nan)
        self._pk = np.full(H, -(10**9), dtype=np.int64)
        self._init_selector(select, guard_margin, mix_lr, mix_share, error_halflife,
                            guard_halflife, self.season, mix_power)
        self._hs = np.arange(1, H + 1)
        self._rows_h = np.arange(H)

    def observe_rows(self, observer: RowObserver | None) -> None:
        """Hand every learning row to ``observer`` (None: stop).  Used to collect
        sufficient statistics for federated least squares; does not change what the
        forecaster learns or forecasts.

        Each time actuals complete targets, ``observer.rows(horizons, X, target, missing,
        seasonal)`` gets, for ``k`` rows: horizon indices (0-based), the scale-free
        features (k x F, as learned: unknown entries are 0), the clipped scale-free
        targets, which features were unknown when the forecast was made (k x F bool),
        and whether the base forecast was seasonal naive (k bool; False = no value one
        season back, the base was the level, as in an endpoint's first season).
        """
        self._row_observer = observer
        self._pmiss = np.zeros((self.max_horizon,) * 2 + (N_FEATURES,), dtype=bool)
        self._psn = np.zeros((self.max_horizon,) * 2, dtype=bool)
        self._miss = np.zeros((self.max_horizon, N_FEATURES), dtype=bool)
        self._sn_ok = np.zeros(self.max_horizon, dtype=bool)

    def set_global_model(self, model: TreeEnsemble | None) -> None:
        """Use ``model`` (global trees over :func:`tree_features` rows predicting the
        scale-free seasonal-naive error, shared by many forecasters) as the blend's
        ``global_trees`` candidate from the next forecast on; None: no such candidate.

        The model is not pickled with the forecaster, only :attr:`global_version`: after
        loading a snapshot, set the model of that version again to continue bit for bit.
        """
        if model is not None and model.n_features != N_FEATURES + 3:
            raise ValueError(f"global model: expected {N_FEATURES + 3} features, "
                             f"got {model.n_features}")
        self._global = model
        self.global_version = model.version if model is not None else 0

    @property
    def global_model(self) -> TreeEnsemble | None:
        """The global trees in use (see :meth:`set_global_model`); None: none."""
        return self._global

    @property
    def tree_periods(self) -> tuple[float, float]:
        """Steps per day (season) and per week, as :func:`tree_features` takes them."""
        week = self.long_season_seconds or 7 * 86400
        return self.season_seconds / self.step_seconds, week / self.step_seconds

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_gather", None)  # derived: rebuilt on first use
        state.pop("_global", None)  # shared: travels by version (set_global_model)
        state.pop("_tree_buf", None)  # derived: rebuilt on first use
        state.pop("_tree_step", None)
        # The observer (a worker's trainer, shared) and its bookkeeping are attached again
        # by whoever loads the snapshot; rows of steps pending then are not observed.
        for k in ("_row_observer", "_pmiss", "_psn", "_miss", "_sn_ok"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._add_candidate_columns()  # a snapshot made before the global candidate

    # -- BandedForecaster hooks -------------------------------------------------------
    def _max_gap_fill(self) -> int:
        return self._L

    def _observe(self, value: float) -> None:
        self._y[self._t % self._L] = value
        if math.isnan(value):
            return
        self._learn_targets(value)
        self._track(value)

    def _points(self, n: int) -> np.ndarray:
        cur = self._predict()
        if n <= self.max_horizon:
            return cur[:n]
        # Past the modelled horizons: seasonal naive (or the level) for the rest.
        return np.concatenate([cur, self._seasonal_naive_beyond(n)])

    # -- one step ---------------------------------------------------------------------
    def _predict(self) -> np.ndarray:
        H, t = self.max_horizon, self._t
        r = t % H
        # This step's candidates are written straight into the pending slot: they are
        # remembered to learn and score them when the actuals arrive.
        C = self._pC[r]
        X, s = self._features(C)
        C[:, 0] = C[:, 1] + s * self._correction(X)  # the model: base + level * correction
        g = self._global
        if g is None:
            C[:, K_GLOBAL] = np.nan
        else:
            z = g.predict(self._tree_rows(X, *self.tree_periods))
            np.maximum(z, -FCLIP, out=z)
            np.minimum(z, FCLIP, out=z)
            C[:, K_GLOBAL] = C[:, 1] + s * z
        self._pX[r] = X
        # Learning reads the base from C; _pbase is kept so a rollback can load snapshots.
        self._pbase[r] = C[:, 1]
        self._ps[r] = s
        self._pk[r] = t
        if self._row_observer is not None:
            self._pmiss[r] = self._miss
            self._psn[r] = self._sn_ok
        return self._combine(C)

    def _learn_targets(self, value: float) -> None:
        """Targets that ``value`` completes: horizon h of the forecast made h steps ago."""
        H, t = self.max_horizon, self._t
        made = t - self._hs
        rows = made % H
        ok = self._pk[rows] == made
        # Usually every horizon completes: then whole arrays, no index copies.
        full = bool(ok.all())
        if full:
            hi, rws = self._rows_h, rows
        elif ok.any():
            hi, rws = self._rows_h[ok], rows[ok]
        else:
            return
        s = self._ps[rws]
        cands = self._pC[rws, hi]  # (k, C); column 1 is the base forecast
        # Forecasts made in the first season had the level as their base, not seasonal
        # naive: scored, they taught the blend and the guard that "seasonal naive" was
        # poor just before it took over (NYC taxi's second day: MASE 1.5 at h = 15 while
        # seasonal naive made 0.4).  So only later ones are scored.
        scored = made[hi] >= self.season if t < self.season + H else slice(None)
        self._score_candidates(hi[scored], rws[scored], cands[scored], value, s[scored])
        X = self._pX[rws, hi]  # (k, F)
        tgt = (value - cands[:, 1]) / s
        np.maximum(tgt, -FCLIP, out=tgt)
        np.minimum(tgt, FCLIP, out=tgt)
        good = np.isfinite(tgt)
        if not good.all():
            full = False
            hi, X, tgt, rws = hi[good], X[good], tgt[good], rws[good]
            if hi.size == 0:
                return
        if self._row_observer is not None:
            self._row_observer.rows(hi, X, tgt, self._pmiss[rws, hi], self._psn[rws, hi])
        if self.learner == "rls":
            self._rls_update(hi, X, tgt, full)
        else:
            self._sgd_update(hi, X, tgt)
        self._n_upd[hi] += 1
