"""Sufficient statistics of least squares over a forecaster's learning rows, and the
ridge solution of summed statistics (see :mod:`processors.federated`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from processors.forecasting.features import N_FEATURES
from schemas.federated import STAT_PARAMS, Params

__all__ = ["DEFAULT_RIDGE", "RowStats", "prior_covariance", "solve_weights"]

#: Ridge of the least-squares solution, in rows: pulls weights toward 0 (seasonal naive)
#: where the summed rows say little.
DEFAULT_RIDGE = 10.0


class RowStats:
    """Sufficient statistics of least squares over a forecaster's learning rows.

    Attach with ``forecaster.observe_rows(stats)``; one object may observe many
    forecasters (an edge's endpoints).  ``sums[name]`` is (H, F+1, F+1): per horizon the sum
    of ``z z^T`` over rows ``z = (x, target)``; ``x_0 = 1``, so ``[h, 0, 0]`` counts rows.
    Rows whose base was seasonal naive go to ``"gram"``, first-season rows (base = the
    level) to ``"cold_gram"``; ``keep`` says which are collected.

    >>> from processors.forecasting.direct import DirectForecaster
    >>> f = DirectForecaster(step_seconds=3600, max_horizon=2)
    >>> st = RowStats(2, keep=("gram", "cold_gram"))
    >>> f.observe_rows(st)
    >>> for i in range(60):
    ...     _ = f.learn(3600 * i, 100.0 + i % 24)
    >>> int(st.sums["cold_gram"][0, 0, 0]), int(st.sums["gram"][0, 0, 0])
    (23, 36)
    """

    def __init__(self, horizons: int, keep: Iterable[str] = ("gram",)) -> None:
        self.keep = tuple(keep)
        if not set(self.keep) <= set(STAT_PARAMS):
            raise ValueError(f"keep: choose from {sorted(STAT_PARAMS)}")
        shape = (horizons, N_FEATURES + 1, N_FEATURES + 1)
        self.sums: Params = {k: np.zeros(shape) for k in self.keep}

    def rows(self, horizons: np.ndarray, X: np.ndarray, target: np.ndarray,
             missing: np.ndarray, seasonal: np.ndarray) -> None:
        """RowObserver hook (see ``DirectForecaster.observe_rows``)."""
        z = np.concatenate([X, target[:, None]], axis=1)
        for name, sel in (("gram", seasonal), ("cold_gram", ~seasonal)):
            if name in self.sums and sel.any():
                zs = z[sel]
                # Each horizon completes at most once per step: no repeated indices.
                self.sums[name][horizons[sel]] += np.einsum("ki,kj->kij", zs, zs)

    def count(self, name: str) -> int:
        """Rows of ``name`` (horizon 1)."""
        return round(float(self.sums[name][0, 0, 0])) if name in self.sums else 0

    def take(self) -> Params:
        """A copy of the sums (what an update sends)."""
        return {k: v.copy() for k, v in self.sums.items()}

    def subtract(self, sent: Mapping[str, np.ndarray]) -> None:
        """Forget rows already folded into a global version (keep the ones since)."""
        for k, v in sent.items():
            if k in self.sums and v.shape == self.sums[k].shape:
                self.sums[k] -= v


def solve_weights(sums: np.ndarray, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Per-horizon ridge least squares from summed statistics (H, F+1, F+1) -> (H, F).

    The bias weight is not penalized.  A horizon without rows (or a singular system)
    gets zero weights: the seasonal-naive forecast.

    >>> rng = np.random.default_rng(0)
    >>> X = np.c_[np.ones(500), rng.normal(size=(500, 2))]
    >>> z = np.c_[X, X @ [0.5, 2.0, -1.0]]
    >>> np.round(solve_weights((z.T @ z)[None], ridge=0.0), 3).tolist()
    [[0.5, 2.0, -1.0]]
    """
    S = np.asarray(sums, dtype=float)
    H, F = S.shape[0], S.shape[1] - 1
    pen = np.full(F, float(ridge))
    pen[0] = 0.0
    out = np.zeros((H, F))
    for h in range(H):
        if not S[h, 0, 0] > 0:
            continue
        A = S[h, :F, :F] + np.diag(pen)
        try:
            w = np.linalg.solve(A, S[h, :F, F])
        except np.linalg.LinAlgError:
            w, *_ = np.linalg.lstsq(A, S[h, :F, F], rcond=None)
        if np.all(np.isfinite(w)):
            out[h] = w
    return out


def prior_covariance(sums: np.ndarray, samples: float) -> np.ndarray:
    """RLS prior covariance worth ``samples`` rows of the federation's statistics:
    ``(samples * G + I / 10)^-1`` per horizon, ``G = S_xx / n`` the mean information
    matrix (the small identity term keeps unexcited directions finite)."""
    S = np.asarray(sums, dtype=float)
    F = S.shape[1] - 1
    n = np.maximum(S[:, 0, 0], 1e-9)[:, None, None]
    G = np.where(S[:, :1, :1] > 0, S[:, :F, :F] / n, 0.0)
    A = samples * G + np.eye(F)[None] * 0.1
    return np.asarray(np.linalg.inv(A))
