"""The default forecaster's scale-free features (see :mod:`processors.forecasting.direct`).

:class:`SeasonalFeatures` keeps the value history (a float32 ring of the last seasons) and
the running states the features need (EW means, seasonal and weekly differences), and
builds one step's design matrix: per horizon the other candidate forecasts minus the base,
recent seasonal differences and their EW means, the weekly difference, and Fourier terms
of the time of day and of the week, all divided by the level.  It is a mixin of
:class:`~processors.forecasting.direct.DirectForecaster`: the state lives in the
forecaster's own attributes, so snapshots keep their layout.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from processors.forecasting.base import StepClock

__all__ = ["FCLIP", "F_LONG_SEASON", "K_GLOBAL", "N_FEATURES", "N_TREE_FEATURES",
           "SeasonalFeatures", "tree_features"]

_TWO_PI = 2.0 * math.pi
_EW_ALPHAS = (0.5, 0.15, 0.05)  # level EW means offered as candidates
_SD_ALPHAS = (0.3, 0.05)  # EW means of the seasonal difference
_N_LAGS = 4  # recent seasonal differences y[t-k] - y[t-k-m], k < _N_LAGS
_N_DAYS = 7  # multi-season mean over at most this many seasons
_TOD_K, _DOW_K = 3, 2  # Fourier orders
#: Feature / target clip, in units of the level.
FCLIP = 10.0

# Candidate columns (see blend.CANDIDATES): the model 0, the base 1, persistence 2, the EW
# means 3..5, then these.
K_LONG_SEASON = 3 + len(_EW_ALPHAS)
K_MULTI_SEASON = K_LONG_SEASON + 1
K_GLOBAL = K_MULTI_SEASON + 1  # the global trees (processors.forecasting.global_trees)

# Feature layout (columns of the per-horizon design matrix).
C_BIAS = 0
_C_CAND = 1  # persistence, 3 EW means, long-season naive, multi-season mean: 6 columns
_N_CAND_FEATS = 2 + len(_EW_ALPHAS) + 1
_C_LAGS = _C_CAND + _N_CAND_FEATS
#: Feature column of the long-season naive (minus the base, scaled).
F_LONG_SEASON = _C_CAND + K_LONG_SEASON - 2
_C_SD = _C_LAGS + _N_LAGS
_C_WD = _C_SD + len(_SD_ALPHAS)  # EW weekly difference, current weekly difference
_C_TOD = _C_WD + 2
_C_DOW = _C_TOD + 2 * _TOD_K
N_FEATURES = _C_DOW + 2 * _DOW_K
#: Columns of the global trees' rows (see tree_features).
N_TREE_FEATURES = N_FEATURES + 3


def tree_features(X: np.ndarray, horizons: np.ndarray, day_steps: float,
                  week_steps: float) -> np.ndarray:
    """The global trees' rows: the scale-free features ``X`` (k, F) and three more
    columns: the horizon (1-based, ``horizons``), and the phase of the *target* step in
    the day and in the week (0..1), read back from the features' first Fourier pair and
    moved ``h`` steps on (trees split on one phase column far more easily than on
    sines and cosines).  ``day_steps`` and ``week_steps`` are steps per day and week.

    >>> X = np.zeros((2, N_FEATURES))
    >>> X[:, _C_TOD + _TOD_K] = X[:, _C_DOW + _DOW_K] = 1.0  # phase 0: cos 1, sin 0
    >>> tree_features(X, np.array([1, 2]), 4.0, 28.0)[:, N_FEATURES:].tolist()
    [[1.0, 0.25, 0.03571428571428571], [2.0, 0.5, 0.07142857142857142]]
    """
    k = len(X)
    out = np.empty((k, N_TREE_FEATURES))
    out[:, :N_FEATURES] = X
    out[:, N_FEATURES] = horizons
    ang = np.arctan2(X[:, [_C_TOD, _C_DOW]], X[:, [_C_TOD + _TOD_K, _C_DOW + _DOW_K]])
    ang *= _INV_TWO_PI
    ang += horizons[:, None] / np.array([day_steps, week_steps])
    out[:, N_FEATURES + 1 :] = ang % 1.0
    return out


_INV_TWO_PI = 1.0 / _TWO_PI


class SeasonalFeatures:
    """Value history, running states and the per-step design matrix (a mixin)."""

    # Set by BandedForecaster.
    max_horizon: int
    season: int
    season_seconds: int
    _t: int
    _clock: StepClock
    # Set by _init_history.
    long_season_seconds: int | None
    long_season: int
    _n_days: int
    _L: int
    _y: np.ndarray
    _off_sn: np.ndarray
    _off_wk: np.ndarray | None
    _off_days: np.ndarray
    _off_lag: np.ndarray
    _ew: np.ndarray
    _ew_a: np.ndarray
    _sd: np.ndarray
    _sd_a: np.ndarray
    _wd: float
    _last: float
    _gather: np.ndarray | None
    _tree_buf: np.ndarray | None
    _tree_step: np.ndarray
    # Row observation (see DirectForecaster.observe_rows).
    _row_observer: object | None
    _miss: np.ndarray
    _sn_ok: np.ndarray

    if TYPE_CHECKING:
        def _scale(self) -> float: ...

    def _init_history(self, step_seconds: int, long_season_seconds: int | None,
                      max_history: int) -> None:
        H, m = self.max_horizon, self.season
        hs = np.arange(1, H + 1)
        self.long_season_seconds = long_season_seconds
        wk = 0
        if long_season_seconds:
            wk = round(long_season_seconds / step_seconds)
            if wk <= m or wk > max_history:
                wk = 0  # no separate long season (or too long to keep)
        self.long_season = wk
        n_days = min(_N_DAYS, max(1, max_history // m)) if m > 1 else 1
        self._n_days = n_days
        self._L = max(m + _N_LAGS, wk, n_days * m) + 1
        self._y = np.full(self._L, np.nan, dtype=np.float32)  # float32: half the snapshot
        # Offsets (<= 0, relative to t) of y[t+h-m] and y[t+h-wk], always in the past.
        self._off_sn = hs - m * np.ceil(hs / m).astype(np.int64)
        self._off_wk = hs - wk * np.ceil(hs / wk).astype(np.int64) if wk else None
        days = np.arange(1, n_days + 1)
        self._off_days = hs[None, :] - m * (days[:, None] + np.ceil(hs / m).astype(np.int64) - 1)
        self._off_lag = -np.arange(_N_LAGS)
        self._ew = np.full(len(_EW_ALPHAS), np.nan)
        self._ew_a = np.array(_EW_ALPHAS)
        self._sd = np.zeros(len(_SD_ALPHAS))
        self._sd_a = np.array(_SD_ALPHAS)
        self._wd = 0.0
        self._last = math.nan

    def _track(self, value: float) -> None:
        """Update the running states with this step's (known) value."""
        t, L = self._t, self._L
        m, wk = self.season, self.long_season
        y = self._y
        ew = self._ew
        self._ew = np.where(np.isnan(ew), value, ew + self._ew_a * (value - ew))
        prev_season = y[(t - m) % L]
        if not math.isnan(prev_season):
            self._sd += self._sd_a * ((value - prev_season) - self._sd)
        if wk:
            prev_week = y[(t - wk) % L]
            if not math.isnan(prev_week):
                self._wd += 0.1 * ((value - prev_week) - self._wd)
        self._last = value

    def _seasonal_naive_beyond(self, n: int) -> np.ndarray:
        """Seasonal naive (or the level) for horizons ``max_horizon + 1 .. n``."""
        hs = np.arange(self.max_horizon + 1, n + 1)
        m = self.season
        off = hs - m * np.ceil(hs / m).astype(np.int64)
        extra = self._y[(self._t + off) % self._L]
        lvl = self._ew[-1] if not math.isnan(self._ew[-1]) else 0.0
        return np.where(np.isnan(extra), lvl, extra)

    def _tree_rows(self, X: np.ndarray, day_steps: float, week_steps: float) -> np.ndarray:
        """:func:`tree_features` of this step's design matrix (every row made now, so one
        origin phase for all), in a buffer reused from step to step (derived, not
        pickled): a few numpy calls instead of tree_features' dozen."""
        buf = self._tree_buf
        if buf is None:
            hs = np.arange(1, self.max_horizon + 1)
            buf = np.empty((self.max_horizon, N_TREE_FEATURES))
            buf[:, N_FEATURES] = hs
            self._tree_step = hs[:, None] / np.array([day_steps, week_steps])
            self._tree_buf = buf
        buf[:, :N_FEATURES] = X
        row = X[0]
        ang = np.array([math.atan2(row[_C_TOD], row[_C_TOD + _TOD_K]),
                        math.atan2(row[_C_DOW], row[_C_DOW + _DOW_K])])
        ang *= _INV_TWO_PI
        np.add(ang, self._tree_step, out=buf[:, N_FEATURES + 1 :])
        np.mod(buf[:, N_FEATURES + 1 :], 1.0, out=buf[:, N_FEATURES + 1 :])
        return buf

    # Everything here runs once per step on (H, F) = (15, 25)-sized arrays, where numpy's
    # per-call overhead (~0.5 µs) dominates the arithmetic: the code keeps the number of
    # numpy calls low (whole arrays in place when every horizon takes part, one gather for
    # all history lookups) while doing exactly the same floating-point operations, so
    # forecasts stay bit for bit the same.

    def _gather_offsets(self) -> np.ndarray:
        """Offsets (relative to t) of every history value the features read, in the order
        :meth:`_features` slices them: seasonal naive (H), long-season naive (H, if any),
        same step on past days (days x H), recent steps and the same steps a season back.
        Derived from the stored offsets on first use; not pickled."""
        if self._gather is None:
            parts = [self._off_sn]
            if self._off_wk is not None and self.long_season:
                parts.append(self._off_wk)
            parts += [self._off_days.ravel(), self._off_lag, self._off_lag - self.season]
            self._gather = np.concatenate(parts)
        return self._gather

    def _features(self, C: np.ndarray) -> tuple[np.ndarray, float]:
        """Design matrix (H, F) and the level; fills the candidate forecasts (H, C) from
        column 1 on (base, persistence, EW means, long-season naive, multi-season mean; not the
        global trees)."""
        t, L, y = self._t, self._L, self._y
        H, wk = self.max_horizon, self.long_season
        s = self._scale()
        inv = 1.0 / s
        g = y[(t + self._gather_offsets()) % L]  # float32, like the history
        sn, i = g[:H], H
        if wk:
            wkv, i = g[i : i + H], i + H
        else:
            wkv = np.full(H, np.nan)
        days, i = g[i : i + self._n_days * H].reshape(self._n_days, H), i + self._n_days * H
        lag_now, lag_prev = g[i : i + _N_LAGS], g[i + _N_LAGS :]
        C[:, 1] = np.where(np.isnan(sn), self._ew[-1], sn)  # base: seasonal naive or level
        missing = np.isnan(days)
        cnt = self._n_days - missing.sum(axis=0)
        # np.nansum's own steps (NaN -> 0, then a float32 sum over the days).
        C[:, K_MULTI_SEASON] = np.where(cnt > 0, np.where(missing, 0, days).sum(axis=0)
                            / np.maximum(cnt, 1), np.nan)  # multi-season mean
        last = self._last
        C[:, 2] = last  # persistence
        C[:, 3 : 3 + len(_EW_ALPHAS)] = self._ew
        C[:, K_LONG_SEASON] = wkv  # long-season naive
        # Columns that are the same for every horizon: one row, broadcast.
        row = np.empty(N_FEATURES)
        row[C_BIAS] = 1.0
        row[_C_LAGS : _C_LAGS + _N_LAGS] = (lag_now - lag_prev) * inv
        row[_C_SD : _C_SD + len(_SD_ALPHAS)] = self._sd * inv
        row[_C_WD] = self._wd * inv
        row[_C_WD + 1] = (last - y[(t - wk) % L]) * inv if wk else 0
        ts = self._clock.last_ts or 0.0
        ph = _TWO_PI * ts / self.season_seconds
        pw = _TWO_PI * ts / (self.long_season_seconds or 7 * 86400)
        # k * phase for k = 1.._TOD_K (time of day), then 1.._DOW_K (week), one sin/cos call.
        ang = np.array([k * ph for k in range(1, _TOD_K + 1)]
                       + [k * pw for k in range(1, _DOW_K + 1)])
        sin, cos = np.sin(ang), np.cos(ang)
        row[_C_TOD : _C_TOD + _TOD_K] = sin[:_TOD_K]
        row[_C_TOD + _TOD_K : _C_TOD + 2 * _TOD_K] = cos[:_TOD_K]
        row[_C_DOW : _C_DOW + _DOW_K] = sin[_TOD_K:]
        row[_C_DOW + _DOW_K : _C_DOW + 2 * _DOW_K] = cos[_TOD_K:]
        X = np.empty((H, N_FEATURES))
        X[:] = row
        X[:, _C_CAND : _C_CAND + _N_CAND_FEATS] = (C[:, 2:K_GLOBAL] - C[:, 1:2]) * inv
        if self._row_observer is not None:
            self._miss = ~np.isfinite(X)
            self._sn_ok = ~np.isnan(sn)
        # Clip to +-FCLIP, unknown (NaN) -> 0: what nan_to_num + clip gave, in fewer calls.
        np.maximum(X, -FCLIP, out=X)
        np.minimum(X, FCLIP, out=X)
        np.copyto(X, 0.0, where=np.isnan(X))
        return X, s
