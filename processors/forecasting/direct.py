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
candidates (the model, seasonal naive, persistence, the EW means, the long-season naive
and the multi-season mean) whose weights are learned online by exponentiated gradient on
the blend's scale-free absolute error (rate ``mix_lr / h``: horizon h learns from forecasts
made h steps ago), with a small fixed share of uniform weight so a candidate that was poor
can come back.  A candidate without a forecast (no week of history yet) keeps its weight
relative to the blend.  A guard forecasts seasonal naive or persistence instead while its
recent error (EW, half-life half a season) is below ``guard_margin`` times the blend's.
The rate and share were picked on the two traces in ``streams/traces`` -- the same ones
``benchmarks/forecast_accuracy.py`` reports, so those figures are in-sample for them.
``"best"`` (the previous default): the candidate with the smallest EW mean absolute error,
the model favoured by ``guard_margin``.  ``"model"``: the model alone.  ``"blend"``:
inverse-squared-error weights.  Bands are rolling empirical quantiles of the final
forecast's past errors (see :mod:`processors.forecasting.bands`).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from processors.forecasting.bands import BandedForecaster

__all__ = ["DirectForecaster", "RowObserver"]

_TWO_PI = 2.0 * math.pi
_EW_ALPHAS = (0.5, 0.15, 0.05)  # level EW means offered as candidates
_SD_ALPHAS = (0.3, 0.05)  # EW means of the seasonal difference
_N_LAGS = 4  # recent seasonal differences y[t-k] - y[t-k-m], k < _N_LAGS
_N_DAYS = 7  # multi-season mean over at most this many seasons
_TOD_K, _DOW_K = 3, 2  # Fourier orders
_FCLIP = 10.0  # feature / target clip, in units of the level
_MAX = float(np.finfo(np.float64).max)  # what np.nan_to_num turns +inf into

# Feature layout (columns of the per-horizon design matrix).
_C_BIAS = 0
_C_CAND = 1  # persistence, 3 EW means, long-season naive, multi-season mean: 6 columns
_N_CAND_FEATS = 2 + len(_EW_ALPHAS) + 1
_C_LAGS = _C_CAND + _N_CAND_FEATS
_C_SD = _C_LAGS + _N_LAGS
_C_WD = _C_SD + len(_SD_ALPHAS)  # EW weekly difference, current weekly difference
_C_TOD = _C_WD + 2
_C_DOW = _C_TOD + 2 * _TOD_K
N_FEATURES = _C_DOW + 2 * _DOW_K

#: Candidate forecasts the selector chooses between, in column order.
CANDIDATES = ("model", "seasonal_naive", "persistence", "ew_fast", "ew_mid", "ew_slow",
              "long_season_naive", "multi_season_mean")
#: How the final forecast is made from the candidates (see :class:`DirectForecaster`).
SELECTS = ("mix", "best", "model", "blend")
#: Learning rate and fixed share of the online blend (select="mix"); picked on the two
#: traces in streams/traces, the same ones the accuracy benchmark reports.
MIX_LR = 0.5
MIX_SHARE = 1e-5


class RowObserver(Protocol):
    """Receives the learning rows of a :class:`DirectForecaster` (see ``observe_rows``)."""

    def rows(self, horizons: np.ndarray, X: np.ndarray, target: np.ndarray,
             missing: np.ndarray, seasonal: np.ndarray) -> None: ...


class DirectForecaster(BandedForecaster):
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
        guard_halflife: int | None = None,
    ) -> None:
        super().__init__(step_seconds, season_seconds, max_horizon)
        if learner not in ("rls", "sgd"):
            raise ValueError("learner must be 'rls' or 'sgd'")
        if select not in SELECTS:
            raise ValueError(f"select must be one of {', '.join(map(repr, SELECTS))}")
        if not (mix_lr >= 0 and math.isfinite(mix_lr)) or not 0 <= mix_share < 1:
            raise ValueError("mix_lr must be finite and >= 0, mix_share in [0, 1)")
        self.learner = learner
        self.select = select
        self.forgetting = float(forgetting)
        self.lr = float(lr)
        self.guard_margin = float(guard_margin)
        self.mix_lr = float(mix_lr)
        self.mix_share = float(mix_share)
        H, m, F = self.max_horizon, self.season, N_FEATURES
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
        # Learner state (per horizon).
        self.weights = np.zeros((H, F))
        self._P = np.repeat(np.eye(F)[None, :, :] * 10.0, H, axis=0)
        self._x_mean = np.zeros((H, F))  # feature scaler (sgd; also reported for rls)
        self._x_var = np.ones((H, F))
        self._y_var = np.full(H, 1e-2)  # target scale per horizon
        self._res_var = np.full(H, 1e-2)  # robust residual scale for innovation clipping
        self._n_upd = np.zeros(H, dtype=np.int64)
        # Pending (made at step k, row k % H): features, base, level, candidates.
        C = len(CANDIDATES)
        self._pX = np.zeros((H, H, F), dtype=np.float32)
        self._ps = np.full(H, np.nan)
        self._pbase = np.full((H, H), np.nan)  # = _pC[..., 1], for older versions' snapshots
        self._pC = np.full((H, H, C), np.nan)
        self._pk = np.full(H, -(10**9), dtype=np.int64)
        hl = error_halflife if error_halflife else min(max(m, 50), 2000)
        self._err_a = 1.0 - 0.5 ** (1.0 / hl)
        self._cerr = np.full((H, C), np.nan)  # EW mean |error| / level, per candidate
        self._cerr_num = np.zeros((H, C))
        self._cerr_w = np.zeros((H, C))
        self._cerr_n = np.zeros((H, C), dtype=np.int64)
        self._warm = min(hl, 100)  # errors a candidate needs before it can be chosen
        self._chosen = np.zeros(H, dtype=np.int64)
        # Online blend (select="mix"): weights per horizon over the candidates, and the
        # blended forecast made at step k (row k % H) to score it when the actual arrives.
        self._mixw = np.full((H, C), 1.0 / C)
        self._pmix = np.full((H, H), np.nan)
        # EW mean |error| / level of the blend, seasonal naive, persistence (the guard).
        self._gerr = np.zeros((H, 3))
        self._guard_a = 1.0 - 0.5 ** (1.0 / (guard_halflife or max(m // 2, 12)))
        self._hs = hs
        self._rows_h = np.arange(H)

    # -- params for federated averaging -------------------------------------------------
    def get_params(self) -> dict[str, np.ndarray]:
        """Global, scale-free state: per-horizon weights and feature-scaler statistics.

        ``weights`` is (horizons, features).  With the ``"rls"`` learner the weights apply
        to the raw scale-free features (the scaler stays at mean 0, variance 1); with
        ``"sgd"`` they apply to features standardized by ``x_mean``/``x_var`` and predict
        the target in units of ``sqrt(y_var)``.  Either way nothing in here depends on the
        endpoint's traffic volume, so parameters can be averaged across endpoints.  The
        RLS covariance and the online selector's error statistics stay local.
        """
        return {
            "weights": self.weights.copy(),
            "x_mean": self._x_mean.copy(),
            "x_var": self._x_var.copy(),
            "y_var": self._y_var.copy(),
        }

    def set_params(self, params: dict[str, Any]) -> None:
        """Load weights (and optionally scaler statistics) of the same shape."""
        for key, attr in (("weights", "weights"), ("x_mean", "_x_mean"),
                          ("x_var", "_x_var"), ("y_var", "_y_var")):
            if key in params:
                value = np.asarray(params[key], dtype=float)
                cur = getattr(self, attr)
                if value.shape != cur.shape:
                    raise ValueError(f"{key}: expected shape {cur.shape}, got {value.shape}")
                setattr(self, attr, value.copy())

    def set_prior(self, weights: np.ndarray | None = None,
                  covariance: float | np.ndarray | None = None) -> None:
        """Start the per-horizon learners from ``weights`` (H x F, raw scale-free features
        for ``"rls"``) with RLS covariance ``covariance``: a scalar ``v`` means ``v * I``
        for every horizon, an (H, F, F) array one matrix per horizon.

        The covariance is the prior's *uncertainty*: the inverse of how many samples'
        worth of information the prior stands for.  Small values keep the weights close to
        the prior for long, ``0`` freezes them (learning no longer moves them).

        >>> f = DirectForecaster(step_seconds=3600, max_horizon=2)
        >>> f.set_prior(np.ones_like(f.weights), covariance=0.0)
        >>> float(f.weights.sum()) == f.weights.size
        True
        """
        H, F = self.weights.shape
        if weights is not None:
            w = np.asarray(weights, dtype=float)
            if w.shape != (H, F):
                raise ValueError(f"weights: expected shape {(H, F)}, got {w.shape}")
            self.weights = w.copy()
        if covariance is not None:
            c = np.asarray(covariance, dtype=float)
            if c.ndim == 0:
                c = np.repeat(np.eye(F)[None] * float(c), H, axis=0)
            if c.shape != (H, F, F) or not np.all(np.isfinite(c)):
                raise ValueError(f"covariance: expected a finite scalar or shape {(H, F, F)}")
            self._P = c.copy()

    def selector_errors(self) -> tuple[np.ndarray, np.ndarray]:
        """Scale-free EW mean absolute error of each selector candidate (H x C, columns
        in :data:`CANDIDATES` order; NaN = never scored) and the weight behind each entry
        (the bias-corrected EW weight sum, about the number of recent errors)."""
        num, w = self._cerr_num, self._cerr_w
        with np.errstate(invalid="ignore", divide="ignore"):
            err = np.where(w > 0, num / np.maximum(w, 1e-12), np.nan)
        return err, w.copy()

    def seed_selector(self, errors: np.ndarray, pseudo_count: float) -> None:
        """Give the online selector a track record before it has one of its own.

        ``errors`` (H x C, :data:`CANDIDATES` order, NaN = no record) count as
        ``pseudo_count`` past errors of each candidate, so they are usable at once and own
        errors replace them as they arrive (the EW mean is bias-corrected).  Without a
        record a new forecaster uses seasonal naive (or the level) until every candidate
        has scored ``min(halflife, 100)`` errors itself.  With ``select="mix"`` the
        record also sets the blend's starting weights: half a softmax of ``-5 x error``
        over the candidates with a record, half uniform.
        """
        e = np.asarray(errors, dtype=float)
        if e.shape != self._cerr.shape:
            raise ValueError(f"errors: expected shape {self._cerr.shape}, got {e.shape}")
        if not pseudo_count > 0:
            raise ValueError("pseudo_count must be > 0")
        ok = np.isfinite(e)
        self._cerr_num = np.where(ok, e * pseudo_count, self._cerr_num)
        self._cerr_w = np.where(ok, float(pseudo_count), self._cerr_w)
        self._cerr_n = np.where(ok, np.maximum(self._cerr_n, self._warm), self._cerr_n)
        self._cerr = np.where(ok, e, self._cerr)
        if self.select == "mix":
            # The blend starts half from the record (softmax of -5 x error), half uniform.
            z = np.where(ok, -5.0 * e, -np.inf)
            z -= np.where(ok.any(axis=1), z.max(axis=1), 0.0)[:, None]
            w = np.exp(z)
            tot = w.sum(axis=1, keepdims=True)
            w = np.where(tot > 0, w / np.where(tot > 0, tot, 1.0), 1.0 / e.shape[1])
            self._mixw = 0.5 * w + 0.5 / e.shape[1]

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

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_gather", None)  # derived: rebuilt on first use
        return state

    # -- BandedForecaster hooks -------------------------------------------------------
    def _max_gap_fill(self) -> int:
        return self._L

    def _observe(self, value: float) -> None:
        t, L = self._t, self._L
        m, wk = self.season, self.long_season
        y = self._y
        y[t % L] = value
        if math.isnan(value):
            return
        self._learn_targets(value)
        # Update running states.
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

    def _points(self, n: int) -> np.ndarray:
        H = self.max_horizon
        cur = self._predict()
        if n <= H:
            return cur[:n]
        # Past the modelled horizons: seasonal naive (or the level) for the rest.
        hs = np.arange(H + 1, n + 1)
        m = self.season
        off = hs - m * np.ceil(hs / m).astype(np.int64)
        extra = self._y[(self._t + off) % self._L]
        lvl = self._ew[-1] if not math.isnan(self._ew[-1]) else 0.0
        return np.concatenate([cur, np.where(np.isnan(extra), lvl, extra)])

    # -- internals --------------------------------------------------------------------
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
        column 1 on (base, persistence, EW means, long-season naive, multi-season mean)."""
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
        C[:, -1] = np.where(cnt > 0, np.where(missing, 0, days).sum(axis=0)
                            / np.maximum(cnt, 1), np.nan)  # multi-season mean
        last = self._last
        C[:, 2] = last  # persistence
        C[:, 3 : 3 + len(_EW_ALPHAS)] = self._ew
        C[:, -2] = wkv  # long-season naive
        # Columns that are the same for every horizon: one row, broadcast.
        row = np.empty(N_FEATURES)
        row[_C_BIAS] = 1.0
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
        X[:, _C_CAND : _C_CAND + _N_CAND_FEATS] = (C[:, 2:] - C[:, 1:2]) * inv
        if self._row_observer is not None:
            self._miss = ~np.isfinite(X)
            self._sn_ok = ~np.isnan(sn)
        # Clip to +-_FCLIP, unknown (NaN) -> 0: what nan_to_num + clip gave, in fewer calls.
        np.maximum(X, -_FCLIP, out=X)
        np.minimum(X, _FCLIP, out=X)
        np.copyto(X, 0.0, where=np.isnan(X))
        return X, s

    def _predict(self) -> np.ndarray:
        H, t = self.max_horizon, self._t
        r = t % H
        # This step's candidates are written straight into the pending slot: they are
        # remembered to learn and score them when the actuals arrive.
        C = self._pC[r]
        X, s = self._features(C)
        if self.learner == "rls":
            z = np.einsum("hf,hf->h", X, self.weights)
        else:
            Xs = (X - self._x_mean) / np.sqrt(self._x_var)
            Xs[:, _C_BIAS] = 1.0
            z = np.einsum("hf,hf->h", Xs, self.weights) * np.sqrt(self._y_var)
        np.maximum(z, -_FCLIP, out=z)
        np.minimum(z, _FCLIP, out=z)
        C[:, 0] = C[:, 1] + s * z  # the model: base + level * scale-free correction
        self._pX[r] = X
        # Learning reads the base from C; _pbase is kept so a rollback can load snapshots.
        self._pbase[r] = C[:, 1]
        self._ps[r] = s
        self._pk[r] = t
        if self._row_observer is not None:
            self._pmiss[r] = self._miss
            self._psn[r] = self._sn_ok
        return self._combine(C)

    def _combine(self, C: np.ndarray) -> np.ndarray:
        if self.select == "model":
            return C[:, 0]
        if self.select == "mix":
            # Weighted mean of the candidates that have a forecast, weights renormalized.
            ok = ~np.isnan(C)
            w = np.where(ok, self._mixw, 0.0)
            tot = w.sum(axis=1)
            out = np.where(ok, C, 0.0)
            out *= w
            out = out.sum(axis=1) / np.where(tot > 0, tot, 1.0)
            out = np.where(tot > 0, out, C[:, 1])
            self._pmix[self._t % self.max_horizon] = out
            # Guard: while seasonal naive or persistence has had a clearly smaller recent
            # error than the blend, forecast with it (the blend's weights move too slowly
            # to leave a component that has just gone wrong, e.g. in a holiday week).
            ge = self._gerr
            best = 1 + np.argmin(ge[:, 1:], axis=1)
            use = ge[self._rows_h, best] < self.guard_margin * ge[:, 0]
            if use.any():
                base = C[self._rows_h, best]
                out = np.where(use & ~np.isnan(base), base, out)
            return out
        err = self._cerr
        # A candidate without a forecast or without a score yet is never chosen (inf);
        # the clip is nan_to_num's +-inf -> +-max, so an overflowed score still ranks.
        scored = np.where(np.isnan(C) | np.isnan(err), np.inf,
                          np.minimum(np.maximum(err, -_MAX), _MAX))
        if self.select == "best":
            # Before any error is known prefer seasonal naive, then the model.  Another
            # candidate must beat the model by the margin: switching on noise costs.
            scored[:, 0] *= self.guard_margin
            idx = np.argmin(scored, axis=1)
            idx = np.where(np.isfinite(scored[self._rows_h, idx]), idx, 1)
            out = C[self._rows_h, idx]
            out = np.where(np.isnan(out), C[:, 0], out)
            self._chosen = idx
            return out
        # blend: inverse-squared-error weights over the available candidates
        w = np.where(np.isfinite(scored), 1.0 / np.maximum(scored, 1e-9) ** 2, 0.0)
        tot = w.sum(axis=1)
        Cz = np.nan_to_num(C, nan=0.0)
        out = np.where(tot > 0, (w * Cz).sum(axis=1) / np.maximum(tot, 1e-300), C[:, 0])
        return out

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
        # Candidate errors (scale-free), EW mean per horizon.
        e = np.abs(value - cands) / s[:, None]
        # Bias-corrected EW mean (sum of decayed errors / sum of decayed weights), so the
        # first few errors of a new candidate do not stand for its accuracy for long.
        keep = 1.0 - self._err_a
        seen = ~np.isnan(e)
        num = self._cerr_num if full else self._cerr_num[hi]
        wsum = self._cerr_w if full else self._cerr_w[hi]
        # e >= 0, so the minimum is nan_to_num's inf -> max on the entries kept.
        num = np.where(seen, num * keep + np.minimum(e, _MAX), num)
        wsum = np.where(seen, wsum * keep + 1.0, wsum)
        if full:
            self._cerr_num, self._cerr_w = num, wsum
            self._cerr_n += seen
            cerr_n = self._cerr_n
        else:
            self._cerr_num[hi], self._cerr_w[hi] = num, wsum
            self._cerr_n[hi] += seen
            cerr_n = self._cerr_n[hi]
        cerr = np.where(cerr_n >= self._warm, num / np.maximum(wsum, 1e-12), np.nan)
        if full:
            self._cerr = cerr
        else:
            self._cerr[hi] = cerr
        if self.select == "mix":
            self._mix_update(hi, rws, cands, value, s)
        X = self._pX[rws, hi]  # (k, F)
        tgt = (value - cands[:, 1]) / s
        np.maximum(tgt, -_FCLIP, out=tgt)
        np.minimum(tgt, _FCLIP, out=tgt)
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

    def _mix_update(self, hi: np.ndarray, rws: np.ndarray, cands: np.ndarray, value: float,
                    s: np.ndarray) -> None:
        """Exponentiated-gradient step of the blend weights of horizons ``hi`` on the
        absolute error of the blend, scale-free, then a fixed share of uniform weight so a
        candidate that was poor can come back when the series changes."""
        pred = self._pmix[rws, hi]
        # Recent errors of the blend, seasonal naive and persistence, for the guard.
        ge = np.abs(np.column_stack([pred, cands[:, 1], cands[:, 2]]) - value) / s[:, None]
        gerr = self._gerr[hi]
        self._gerr[hi] = np.where(np.isnan(ge), gerr,
                                  gerr + self._guard_a * (np.minimum(ge, _FCLIP) - gerr))
        ok = ~np.isnan(cands)
        # d|sum_c w_c x_c / sum_c w_c - y| / dw_c ~ sign(pred - y) (x_c - y) / level.
        g = np.sign(pred - value)[:, None] * (cands - value) / s[:, None]
        ok &= np.isfinite(g)
        g = np.where(ok, np.minimum(np.maximum(g, -_FCLIP), _FCLIP), 0.0)
        w = self._mixw[hi]
        # A candidate without a forecast (no week of history yet ...) takes the blend's
        # mean gradient: it keeps its weight relative to the blend, neither gaining weight
        # while the others err nor losing it.
        wa = np.where(ok, w, 0.0)
        gm = (wa * g).sum(axis=1) / np.maximum(wa.sum(axis=1), 1e-300)
        g = np.where(ok, g, gm[:, None])
        g = np.where(np.isnan(pred)[:, None], 0.0, g)
        # Horizon h learns from forecasts made h steps ago, so h updates are in flight at
        # once: the rate is divided by h (a fixed rate oscillates at long horizons).
        lr = self.mix_lr / self._hs[hi]
        w = w * np.exp(-lr[:, None] * g)
        w /= w.sum(axis=1, keepdims=True)
        a = self.mix_share
        self._mixw[hi] = (1.0 - a) * w + a / w.shape[1]

    def _rls_update(self, hi: np.ndarray, X: np.ndarray, tgt: np.ndarray, full: bool) -> None:
        """One exponentially-forgetting RLS step for horizons ``hi``; ``full``: ``hi`` is
        every horizon in order, so weights and covariances are updated in place."""
        lam = self.forgetting
        W = self.weights if full else self.weights[hi]
        P = self._P if full else self._P[hi]
        err = tgt - np.einsum("kf,kf->k", X, W)
        # Robust: clip the innovation at 3 running residual standard deviations.
        rv = self._res_var[hi]
        sd3 = 3 * np.sqrt(rv)
        e_c = np.where(self._n_upd[hi] > 50, np.minimum(np.maximum(err, -sd3), sd3), err)
        self._res_var[hi] = rv + 0.01 * (np.minimum(err * err, 9 * rv + 1e-6) - rv)
        Px = np.einsum("kij,kj->ki", P, X)
        denom = lam + np.einsum("ki,ki->k", X, Px)
        K = Px / denom[:, None]
        W += K * e_c[:, None]
        P -= K[:, :, None] * Px[:, None, :]
        P /= lam
        # Keep P bounded where features are not excited (forgetting would blow it up).
        tr = np.einsum("kii->k", P)
        cap = 10.0 * N_FEATURES
        big = tr > cap
        if big.any():
            # Scale the capped horizons, the others by exactly 1.0: one pass over P
            # instead of gathering and scattering the capped ones.
            scale = np.ones_like(tr)
            np.divide(cap, tr, out=scale, where=big)
            P *= scale[:, None, None]
        if not full:
            self.weights[hi] = W
            self._P[hi] = P

    def _sgd_update(self, hi: np.ndarray, X: np.ndarray, tgt: np.ndarray) -> None:
        a = 0.002
        mu, var = self._x_mean[hi], self._x_var[hi]
        d = X - mu
        mu = mu + a * d
        var = np.maximum(var + a * (d * d - var), 1e-6)
        self._x_mean[hi], self._x_var[hi] = mu, var
        yv = self._y_var[hi] + a * (tgt * tgt - self._y_var[hi])
        yv = np.maximum(yv, 1e-6)
        self._y_var[hi] = yv
        Xs = (X - mu) / np.sqrt(var)
        Xs[:, _C_BIAS] = 1.0
        W = self.weights[hi]
        pred = np.einsum("kf,kf->k", Xs, W)
        g = np.clip(pred - tgt / np.sqrt(yv), -1.0, 1.0)  # clipped gradient
        self.weights[hi] = W - self.lr * g[:, None] * Xs
