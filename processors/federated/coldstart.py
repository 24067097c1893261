"""Starting a new endpoint's default forecaster from the global model (cold start)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from processors.federated.params import SCALER, WEIGHT_PARAMS, _direct, load_weights
from processors.federated.statistics import prior_covariance
from processors.forecasting.blend import CANDIDATES
from processors.forecasting.direct import DirectForecaster
from schemas.federated import STAT_PARAMS, GlobalState

__all__ = ["COLD_ERROR_COLUMNS", "ColdStartForecaster", "adopt_global", "warm_start"]

#: Candidate names of the selector, in the column order of ``cold_errors``.
COLD_ERROR_COLUMNS = CANDIDATES


def _prior(state_params: Mapping[str, np.ndarray], stat: str, samples: float,
           fallback: float) -> float | np.ndarray:
    """Prior covariance from the global statistics ``stat``, or ``fallback * I``."""
    S = state_params.get(stat)
    if S is None or np.ndim(S) != 3 or not float(np.asarray(S)[0, 0, 0]) > 0:
        return fallback
    return prior_covariance(S, samples)


def adopt_global(f: Any, state: GlobalState, prior_samples: float | None = None,
                 fallback_prior: float = 0.1) -> bool:
    """Load a global version's (mature) weights into a running default forecaster, with an
    RLS prior worth ``prior_samples`` rows (default: one season) of the global statistics
    (``fallback_prior * I`` when the version has none).  Returns False if it has no
    weights."""
    inner = _direct(f)
    w = state.params.get("weights")
    if w is None:
        return False
    load_weights(inner, w, {k: state.stats[k] for k in SCALER if k in state.stats})
    k = float(prior_samples or inner.season)
    inner.set_prior(covariance=_prior(state.params, "gram", k, fallback_prior))
    return True


def _seed(f: DirectForecaster, errors: np.ndarray | None, pseudo_count: float | None) -> None:
    """Seed the selector with the federation's cold-start errors (see warm_start)."""
    H, C = f.max_horizon, len(CANDIDATES)
    e = np.full((H, C), np.nan) if errors is None else np.asarray(errors, dtype=float)
    if e.ndim == 2 and e.shape[0] == H and e.shape[1] < C:
        # A global version from before the later candidates (global_trees): no record.
        e = np.concatenate([e, np.full((H, C - e.shape[1]), np.nan)], axis=1)
    if e.shape != (H, C):
        return
    if not np.isfinite(e[:, 0]).any():
        e = e.copy()
        e[:, 0] = 0.0  # no record at all: trust the model, local errors take over fast
    f.seed_selector(e, pseudo_count or float(min(f.season, 100)))


class ColdStartForecaster:
    """A warm-started default forecaster: cold-start weights for its first season, then the
    global weights.  Implements the Forecaster protocol; picklable; other attributes
    (``get_params``, ``weights`` ...) pass through to ``inner``.

    ``mature_prior`` is the RLS prior covariance taken on at graduation (a scalar ``v``
    means ``v * I``, or one (F, F) matrix per horizon).
    """

    kind = "default+warm"

    def __init__(self, inner: DirectForecaster, mature: np.ndarray | None,
                 mature_stats: Mapping[str, np.ndarray] | None = None,
                 graduate_after: int | None = None,
                 mature_prior: float | np.ndarray = 0.01, version: int = 0) -> None:
        self.inner = inner
        self.mature = None if mature is None else np.asarray(mature, dtype=float)
        self.mature_stats = dict(mature_stats or {})
        self.graduate_after = inner.season if graduate_after is None else int(graduate_after)
        self.mature_prior: float | np.ndarray = mature_prior
        self.graduated = False
        self.version = version  # global version it started from

    @property
    def step_seconds(self) -> int:
        return self.inner.step_seconds

    @property
    def observations(self) -> int:
        return self.inner.observations

    @property
    def last_ts(self) -> float | None:
        return self.inner.last_ts

    def learn(self, ts: float, value: float) -> bool:
        ok = self.inner.learn(ts, value)
        if not self.graduated and self.inner.observations >= self.graduate_after:
            self.graduate()
        return ok

    def forecast(self, horizon: int = 15) -> list[Any]:
        return self.inner.forecast(horizon)

    def graduate(self) -> None:
        """Switch from the cold-start weights to the global weights (after one season)."""
        self.graduated = True
        if self.mature is not None:
            load_weights(self.inner, self.mature, self.mature_stats)
            self.inner.set_prior(covariance=self.mature_prior)
        self.mature_prior = 0.0  # not needed any more: keep snapshots small

    def update_global(self, state: GlobalState, prior_samples: float | None = None) -> None:
        """A newer global version: graduate onto it (or load it, once graduated)."""
        if "weights" in state.params:
            self.mature = state.params["weights"]
            self.mature_stats = {k: state.stats[k] for k in SCALER if k in state.stats}
            if self.graduated:
                adopt_global(self.inner, state, prior_samples)
            else:
                k = float(prior_samples or self.inner.season)
                self.mature_prior = _prior(state.params, "gram", k, 0.01)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # during unpickling, before __dict__ is filled
            raise AttributeError(name)
        return getattr(self.inner, name)


def warm_start(forecaster: Any, global_params: GlobalState | Mapping[str, np.ndarray], *,
               prior_samples: float | None = None, pseudo_count: float | None = None,
               cold_prior: float = 0.1, mature_prior: float = 0.01) -> Any:
    """Start a *new* endpoint's default forecaster from the global model; returns the
    forecaster to use from now on (the same object, or a :class:`ColdStartForecaster`
    around it when the global model has cold-start weights).

    With ``cold_weights``: those weights, and the selector seeded with the federation's
    cold-start errors as ``pseudo_count`` errors of each candidate (default: a season, at
    most 100), so it uses the model from the first step only for the horizons where the
    model beat the baselines in cold starts; after one season it switches to the global
    ``weights``.  Without: just the global weights.  The RLS prior of either is worth
    ``prior_samples`` rows (default one season) of the matching global statistics
    (``cold_gram``, ``gram``): the endpoint's own first season counts as much as the
    federation's prior.  Global models without statistics (weight averaging) use
    ``cold_prior * I`` / ``mature_prior * I``.  Forecasters of other kinds are returned
    unchanged.

    >>> import numpy as np
    >>> from processors.federated.params import family_of
    >>> f = DirectForecaster(step_seconds=3600, max_horizon=3)
    >>> g = GlobalState(family_of(f), 3, {"weights": np.ones((3, f.weights.shape[1]))})
    >>> warm_start(f, g) is f, float(f.weights.sum()) == f.weights.size
    (True, True)
    """
    if isinstance(global_params, GlobalState):
        state = global_params
    else:
        state = GlobalState("", 0, {k: np.asarray(v) for k, v in global_params.items()
                                    if k in WEIGHT_PARAMS or k in STAT_PARAMS},
                            {k: np.asarray(v) for k, v in global_params.items()
                             if k not in WEIGHT_PARAMS and k not in STAT_PARAMS})
    params, stats = state.params, state.stats
    if not isinstance(forecaster, DirectForecaster):
        return forecaster
    if forecaster.observations:
        raise ValueError("warm_start is for new endpoints: this forecaster already learned")
    shape = forecaster.weights.shape
    mature = params.get("weights")
    cold = params.get("cold_weights")
    scaler = {k: stats[k] for k in SCALER if k in stats}
    k = float(prior_samples or forecaster.season)
    if mature is not None and np.shape(mature) != shape:
        raise ValueError(f"global weights have shape {np.shape(mature)}, expected {shape}")
    if cold is None or not np.any(cold) or np.shape(cold) != shape:
        if mature is not None:
            adopt_global(forecaster, state, prior_samples, mature_prior)
        return forecaster
    load_weights(forecaster, cold, scaler)
    forecaster.set_prior(covariance=_prior(params, "cold_gram", k, cold_prior))
    _seed(forecaster, stats.get("cold_errors"), pseudo_count)
    return ColdStartForecaster(forecaster, mature, scaler,
                               mature_prior=_prior(params, "gram", k, mature_prior),
                               version=state.version)
