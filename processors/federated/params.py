"""A default forecaster's family and the part of it that may be shared.

Only the weights (on the raw scale-free features) and, for the ``"sgd"`` learner, the
feature scaler's moments leave an endpoint; see :mod:`processors.federated`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from processors.forecasting.direct import DirectForecaster
from schemas.federated import Params

__all__ = ["SCALER", "WEIGHT_PARAMS", "family_of", "load_weights", "shared_view"]

#: Parameters that are averaged as deltas (weights); the rest of a model is statistics.
WEIGHT_PARAMS = ("weights", "cold_weights")
#: The ``"sgd"`` learner's feature-scaler moments (shared as statistics, merged by pooling).
SCALER = ("x_mean", "x_var", "y_var")


def family_of(f: Any) -> str:
    """The model family a forecaster belongs to: weights are only shared within one.

    Shapes and meanings of the weights depend on the learner, the step, the season and
    the number of horizons, so all of them are in the name.

    >>> family_of(DirectForecaster(step_seconds=300, max_horizon=15))
    'default-rls/300s/86400s/h15'
    """
    inner = _direct(f)
    return (f"{inner.kind}-{inner.learner}/{inner.step_seconds}s/{inner.season_seconds}s/"
            f"h{inner.max_horizon}")


def _direct(f: Any) -> DirectForecaster:
    """The default forecaster in ``f`` (itself, or the one a cold-start wrapper holds)."""
    inner = f if isinstance(f, DirectForecaster) else getattr(f, "inner", f)
    if not isinstance(inner, DirectForecaster):
        raise TypeError(f"federated learning needs the default forecaster, not {type(f).__name__}")
    return inner


def _to_raw(w: np.ndarray, mean: np.ndarray, var: np.ndarray, yvar: np.ndarray) -> np.ndarray:
    """SGD weights on standardized features -> coefficients on the raw scale-free features."""
    sd, sy = np.sqrt(var), np.sqrt(yvar)[:, None]
    a = w * sy / sd
    a[:, 0] = sy[:, 0] * (w[:, 0] - (w[:, 1:] * mean[:, 1:] / sd[:, 1:]).sum(axis=1))
    return a


def _from_raw(a: np.ndarray, mean: np.ndarray, var: np.ndarray, yvar: np.ndarray) -> np.ndarray:
    sd, sy = np.sqrt(var), np.sqrt(yvar)[:, None]
    w = a * sd / sy
    w[:, 0] = a[:, 0] / sy[:, 0] + (w[:, 1:] * mean[:, 1:] / sd[:, 1:]).sum(axis=1)
    return w


def shared_view(f: Any) -> tuple[np.ndarray, Params]:
    """(raw-feature weights, scaler statistics) of a forecaster: what it may share.

    The scaler is empty for the ``"rls"`` learner (its scaler is the identity).
    """
    inner = _direct(f)
    p = inner.get_params()
    if inner.learner == "rls":
        return p["weights"], {}
    stats = {k: p[k] for k in SCALER}
    return _to_raw(p["weights"], p["x_mean"], p["x_var"], p["y_var"]), stats


def load_weights(f: Any, raw: np.ndarray, stats: Mapping[str, np.ndarray] | None = None) -> None:
    """Load raw-feature weights (and, for ``"sgd"``, the merged scaler) into ``f``."""
    inner = _direct(f)
    raw = np.asarray(raw, dtype=float)
    if inner.learner == "rls":
        inner.set_params({"weights": raw})
        return
    cur = inner.get_params()
    scaler = {k: np.asarray((stats or {}).get(k, cur[k]), dtype=float) for k in SCALER}
    w = _from_raw(raw, scaler["x_mean"], scaler["x_var"], scaler["y_var"])
    inner.set_params({"weights": w, **scaler})
