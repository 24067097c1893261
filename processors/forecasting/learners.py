"""The default forecaster's per-horizon linear learners (see
:mod:`processors.forecasting.direct`).

:class:`HorizonLearners` holds one linear model per horizon on the scale-free features and
learns it online: exponentially-forgetting recursive least squares (``"rls"``) or
standardized SGD with gradient clipping (``"sgd"``), innovations clipped at a few robust
standard deviations.  Its weights (and the SGD scaler) are the global, scale-free state
federated learning shares (:meth:`get_params`).  A mixin of
:class:`~processors.forecasting.direct.DirectForecaster`: the state lives in the
forecaster's own attributes, so snapshots keep their layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from processors.forecasting.features import C_BIAS, FCLIP, N_FEATURES
from processors.forecasting.kernels import rls_update

__all__ = ["LEARNERS", "HorizonLearners"]

LEARNERS = ("rls", "sgd")


class HorizonLearners:
    """Per-horizon online linear models: weights, RLS covariance, SGD scaler (a mixin)."""

    learner: str
    forgetting: float
    lr: float
    weights: np.ndarray
    _P: np.ndarray
    _x_mean: np.ndarray
    _x_var: np.ndarray
    _y_var: np.ndarray
    _res_var: np.ndarray
    _n_upd: np.ndarray

    def _init_learners(self, horizons: int, learner: str, forgetting: float,
                       lr: float) -> None:
        H, F = horizons, N_FEATURES
        self.learner = learner
        self.forgetting = float(forgetting)
        self.lr = float(lr)
        self.weights = np.zeros((H, F))
        self._P = np.repeat(np.eye(F)[None, :, :] * 10.0, H, axis=0)
        self._x_mean = np.zeros((H, F))  # feature scaler (sgd; also reported for rls)
        self._x_var = np.ones((H, F))
        self._y_var = np.full(H, 1e-2)  # target scale per horizon
        self._res_var = np.full(H, 1e-2)  # robust residual scale for innovation clipping
        self._n_upd = np.zeros(H, dtype=np.int64)

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

        >>> from processors.forecasting.direct import DirectForecaster
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

    # -- learning ------------------------------------------------------------------------
    def _correction(self, X: np.ndarray) -> np.ndarray:
        """The models' scale-free corrections of the base forecast, clipped (H,)."""
        if self.learner == "rls":
            z = np.einsum("hf,hf->h", X, self.weights)
        else:
            Xs = (X - self._x_mean) / np.sqrt(self._x_var)
            Xs[:, C_BIAS] = 1.0
            z = np.einsum("hf,hf->h", Xs, self.weights) * np.sqrt(self._y_var)
        np.maximum(z, -FCLIP, out=z)
        np.minimum(z, FCLIP, out=z)
        return z

    def _rls_update(self, hi: np.ndarray, X: np.ndarray, tgt: np.ndarray, full: bool) -> None:
        """One exponentially-forgetting RLS step for horizons ``hi`` (in place; ``full``:
        ``hi`` is every horizon in order).  The innovation is clipped at 3 running
        residual standard deviations (robust to a spike); a covariance whose trace passes
        10 x features is scaled back, so forgetting cannot blow up directions the features
        do not excite.  Compiled: :func:`~processors.forecasting.kernels.rls_update`."""
        rls_update(self.weights, self._P, np.ascontiguousarray(hi, dtype=np.intp),
                   np.ascontiguousarray(X, dtype=np.float64),
                   np.ascontiguousarray(tgt, dtype=np.float64), self._res_var, self._n_upd,
                   float(self.forgetting), 10.0 * N_FEATURES)

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
        Xs[:, C_BIAS] = 1.0
        W = self.weights[hi]
        pred = np.einsum("kf,kf->k", Xs, W)
        g = np.clip(pred - tgt / np.sqrt(yv), -1.0, 1.0)  # clipped gradient
        self.weights[hi] = W - self.lr * g[:, None] * Xs
