"""Federated learning of the default forecaster: what is shared, statistics, robust rounds.

Plain Python (numpy): no Kafka.  The edge (:mod:`streams.edge.federated`) and the
coordinator (:mod:`processors.apps.coordinator`) wire it to topics.

**Federated least squares.**  The default forecaster
(:class:`~processors.forecasting.direct.DirectForecaster`) predicts, per horizon, a
*scale-free* correction of the seasonal-naive forecast, linear in features divided by the
endpoint's level.  Its weights are a (recursive) least-squares fit, and least squares has
sufficient statistics: for rows ``z = (x, target)`` the sums ``S = sum z z^T`` (the
information matrix ``X^T X``, ``X^T y`` and ``y^T y``; ``x_0 = 1`` so ``S[0, 0]`` is the row
count).  Edges send the sums of their new rows; the coordinator adds them up and the global
weights are the ridge solution of the summed statistics,
``w_h = (S_xx + ridge I)^-1 S_xy`` - the same as least squares on all edges' rows in one
place, whatever way the rows are split between the edges (central *online* training, an
RLS that slowly forgets, lands close: 1.00-1.02x its test error in the benchmark).  Averaging
weights instead (FedAvg) is only exact when the edges' data look alike: on time-split
traces it was 1.3x central's test error (see ``benchmarks/federated.py``).  Rows are kept
apart by regime: ``gram`` from rows whose base was the seasonal-naive value (an endpoint
with a season of history: the model used from then on), ``cold_gram`` from rows made in an
endpoint's first season (base = the level; the edges' *shadow cold starts* produce them),
which give the ``cold_weights`` a new endpoint starts with.

==========================  =========  =====================================================
state                       where      why
==========================  =========  =====================================================
``gram``, ``cold_gram``     global     sums over >= ``min_rows`` rows of products of
(H x (F+1) x (F+1))                    scale-free features and targets (see Privacy)
``weights`` (H x F)         global     solved from ``gram``: per-horizon weights on the raw
                                       scale-free features
``cold_weights`` (H x F)    global     solved from ``cold_gram``: weights for an endpoint's
                                       first season, when no seasonal history exists yet
``cold_errors`` (H x C)     global     scale-free mean absolute error of each candidate of
                                       the online selector during (shadow) cold starts
``x_mean``, ``x_var``,      global     feature-scaler moments, ``"sgd"`` learner only: merged
``y_var`` (sgd)                        by pooling (counts, means, variances)
RLS covariance ``P``        local      the edge's own fit; a warm start sets it from the
                                       global statistics (see below)
level, value ring buffer,   local      they *are* the endpoint's traffic (raw values): they
EW means, seasonal diffs               never leave the edge
selector errors, band       local      per-endpoint accuracy; only their scale-free cold-start
error quantiles                        averages are shared (``cold_errors``)
==========================  =========  =====================================================

*Privacy.*  A statistic is a sum over at least ``min_rows`` rows (an edge holds fewer back
for a later round, see :class:`~streams.edge.federated.EdgeTrainingConfig`) of products
of features that are all divided by the endpoint's level: persistence, EW means, last
week's value *minus the seasonal-naive value, over the level*, time-of-day terms.  Neither
a request count, a rate, a latency nor the level itself is in it, and rows cannot be
recovered from the sums (a horizon's 351 distinct sums of >= 50 rows of ~16 unknowns
each).  On the wire each horizon is sent as a row
count (``num_samples``) with the means and covariance of the row values
(:func:`update_to_record`), so even the count is not a value.  ``noise_multiplier`` adds
Gaussian noise to each round's aggregate (below) for a differential-privacy budget.

*The RLS covariance stays local* (it is one edge's fit).  A warm-started endpoint's
``P`` comes from the global statistics: ``P = (k * G)^-1`` with ``G`` the mean information
matrix per row and ``k`` the prior's strength in samples (default one season): the global
weights count as much as a season of the endpoint's own data, strongly along directions
the federation's data pin down and weakly where they do not.

**Rounds, staleness, robustness.**  Round ``r`` produces version ``r``; an update for it
should be built on version ``r - 1``.  An update built on an older version (staleness
``s``) is *down-weighted* by ``staleness_decay ** s`` up to ``max_staleness`` and *rejected*
beyond (and always rejected when its base is newer than the coordinator's version).
For statistics each update is seen as a row count ``n`` and mean statistics ``G = S / n``:

* ``"fedavg"``: the sum of the updates' statistics (with no bound at all: the plain sum,
  no defence).  With clipping (the default, ``clip_median_multiple`` and/or ``clip_norm``)
  each ``G`` is pulled to within the bound of the global mean statistics so far (as a
  weight delta is clipped around the global weights; in the first round the round's
  coordinate-wise median) - *centred clipping*: honest edges are rarely touched, a poisoned
  one moves the sum by at most the bound, however large its update - and each count (the
  update's weight) is kept within ``[0, multiple x the round's median count]``.
  ``noise_multiplier`` adds symmetric Gaussian noise of ``noise_multiplier * bound *
  max_share`` to the round's mean statistics.
* ``"median"`` / ``"trimmed-mean"``: the same, but the centre is the coordinate-wise median
  / trimmed mean of the round's ``G`` (robust to one poisoned edge of several), and some
  bound always applies (1 x the median deviation if none is configured).  The centre only
  bounds the updates: taking the median of moment matrices as the aggregate itself was
  tried and is not least squares any more (1.22x central's test error on ELB).

Updates that carry weight deltas instead (``weights``; as older edges and tests send)
are averaged the FedAvg way: the mean of the deltas weighted by sample counts, each
clipped to an L2 norm bound, or coordinate-wise median / trimmed mean.  Once a family has
statistics its weights are always solved from them.

>>> import numpy as np
>>> base = GlobalState("f", 0, {"weights": np.zeros((1, 2))})
>>> ups = [ModelDelta("a", "f", 1, 0, 30, {"weights": np.array([[1.0, 0.0]])}),
...        ModelDelta("b", "f", 1, 0, 10, {"weights": np.array([[3.0, 0.0]])})]
>>> aggregate(base, ups, AggregationConfig(clip_norm=None, clip_median_multiple=None))\\
...     .state.params["weights"].tolist()
[[1.5, 0.0]]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from processors.forecasting.direct import CANDIDATES, N_FEATURES, DirectForecaster

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "AggregationConfig",
    "ColdStartForecaster",
    "GlobalState",
    "ModelDelta",
    "RoundCoordinator",
    "RowStats",
    "adopt_global",
    "aggregate",
    "clip_by_norm",
    "family_of",
    "global_from_record",
    "global_to_record",
    "load_weights",
    "merge_stats",
    "prior_covariance",
    "shared_view",
    "solve_weights",
    "staleness_weight",
    "update_from_record",
    "update_to_record",
    "warm_start",
]

AGGREGATIONS = ("fedavg", "median", "trimmed-mean")
#: Parameters that are averaged as deltas (weights); the rest of a model is statistics.
WEIGHT_PARAMS = ("weights", "cold_weights")
#: Sufficient statistics (row sums) and the weights solved from them.
STAT_PARAMS = {"gram": "weights", "cold_gram": "cold_weights"}
_SCALER = ("x_mean", "x_var", "y_var")
#: Ridge of the least-squares solution, in rows: pulls weights toward 0 (seasonal naive)
#: where the summed rows say little.
DEFAULT_RIDGE = 10.0
Params = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- the split


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
    inner = f.inner if isinstance(f, ColdStartForecaster) else f
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
    stats = {k: p[k] for k in _SCALER}
    return _to_raw(p["weights"], p["x_mean"], p["x_var"], p["y_var"]), stats


def load_weights(f: Any, raw: np.ndarray, stats: Mapping[str, np.ndarray] | None = None) -> None:
    """Load raw-feature weights (and, for ``"sgd"``, the merged scaler) into ``f``."""
    inner = _direct(f)
    raw = np.asarray(raw, dtype=float)
    if inner.learner == "rls":
        inner.set_params({"weights": raw})
        return
    cur = inner.get_params()
    scaler = {k: np.asarray((stats or {}).get(k, cur[k]), dtype=float) for k in _SCALER}
    w = _from_raw(raw, scaler["x_mean"], scaler["x_var"], scaler["y_var"])
    inner.set_params({"weights": w, **scaler})


# ----------------------------------------------------------------------------- statistics


class RowStats:
    """Sufficient statistics of least squares over a forecaster's learning rows.

    Attach with ``forecaster.observe_rows(stats)``; one object may observe many
    forecasters (an edge's endpoints).  ``sums[name]`` is (H, F+1, F+1): per horizon the sum
    of ``z z^T`` over rows ``z = (x, target)``; ``x_0 = 1``, so ``[h, 0, 0]`` counts rows.
    Rows whose base was seasonal naive go to ``"gram"``, first-season rows (base = the
    level) to ``"cold_gram"``; ``keep`` says which are collected.

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


# ----------------------------------------------------------------------------- values


@dataclass
class ModelDelta:
    """One edge's update for one round (the pure form of a ModelUpdate record).

    ``samples`` gives per-parameter sample counts where they differ from ``num_samples``
    (cold-start weights rest on the edge's simulated cold starts only).
    """

    edge_id: str
    family: str
    round: int
    base_version: int
    num_samples: int
    delta: Params
    samples: dict[str, int] = field(default_factory=dict)
    stats: Params = field(default_factory=dict)
    validation_error: float | None = None

    def n(self, name: str) -> int:
        return int(self.samples.get(name, self.num_samples))


@dataclass
class GlobalState:
    """One version of a family's global model (the pure form of a GlobalModel record)."""

    family: str
    version: int
    params: Params
    stats: Params = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)  # cumulative, per parameter
    round: int = 0
    aggregation: str = "fedavg"
    participants: list[str] = field(default_factory=list)
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: int = 0  # epoch ms


@dataclass(frozen=True)
class AggregationConfig:
    """How a round's updates become the next version (see the module docstring).

    ``clip_norm`` is an absolute L2 bound per named parameter delta; ``clip_median_multiple``
    an adaptive one (that many times the round's median norm); both apply when both are
    set.  ``noise_multiplier`` needs a bound.  For statistics the bounds apply to each
    update's mean statistics around the round's median (centred clipping).  ``ridge`` is
    the least-squares ridge in rows; ``stats_decay`` multiplies the accumulated statistics
    every round (1 = keep every row: the exact central solution; below 1 the global model
    follows drift, forgetting older rounds).
    """

    method: str = "fedavg"
    clip_norm: float | None = None
    clip_median_multiple: float | None = 3.0
    noise_multiplier: float = 0.0
    trim_fraction: float = 0.25
    max_staleness: int = 2
    staleness_decay: float = 0.5
    seed: int | None = None
    ridge: float = DEFAULT_RIDGE
    stats_decay: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in AGGREGATIONS:
            raise ValueError(f"method must be one of {', '.join(AGGREGATIONS)}, "
                             f"not {self.method!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError("clip_norm must be > 0 (or None for no absolute bound)")
        if self.clip_median_multiple is not None and not self.clip_median_multiple > 0:
            raise ValueError("clip_median_multiple must be > 0 (or None)")
        if self.noise_multiplier < 0:
            raise ValueError("noise_multiplier must be >= 0")
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ValueError("noise_multiplier needs clip_norm: noise is calibrated to the bound")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError("trim_fraction must be in [0, 0.5)")
        if self.max_staleness < 0 or not 0 < self.staleness_decay <= 1:
            raise ValueError("max_staleness must be >= 0 and staleness_decay in (0, 1]")
        if not self.ridge >= 0 or not 0 < self.stats_decay <= 1:
            raise ValueError("ridge must be >= 0 and stats_decay in (0, 1]")


@dataclass
class Aggregation:
    """The result of one round: the new state, and the updates left out and why."""

    state: GlobalState
    rejected: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- rules


def staleness_weight(base_version: int, current_version: int, max_staleness: int = 2,
                     decay: float = 0.5) -> float | None:
    """Weight factor of an update built on ``base_version``; None = rejected.

    >>> staleness_weight(3, 3), staleness_weight(2, 3), staleness_weight(0, 3)
    (1.0, 0.5, None)
    """
    s = current_version - base_version
    if s < 0 or s > max_staleness:
        return None
    return float(decay ** s)


def clip_by_norm(delta: np.ndarray, bound: float | None) -> tuple[np.ndarray, float, bool]:
    """``delta`` scaled down to L2 norm ``bound`` if larger: (clipped, norm, was_clipped).

    >>> c, n, was = clip_by_norm(np.array([3.0, 4.0]), 1.0)
    >>> c.tolist(), n, was
    ([0.6000000000000001, 0.8], 5.0, True)
    """
    norm = float(np.linalg.norm(delta))
    if not math.isfinite(norm):
        return np.zeros_like(delta), norm, True
    if bound is None or norm <= bound:
        return delta, norm, False
    return delta * (bound / norm), norm, True


def _robust(stack: np.ndarray, method: str, trim: float) -> np.ndarray:
    if method == "median":
        return np.asarray(np.median(stack, axis=0))
    k = math.floor(trim * stack.shape[0])
    srt = np.sort(stack, axis=0)
    return np.asarray(srt[k: stack.shape[0] - k].mean(axis=0))


def _aggregate_stats(name: str, rows: Sequence[tuple[ModelDelta, float]],
                     config: AggregationConfig, rng: np.random.Generator,
                     metrics: dict[str, float], prev: np.ndarray | None = None
                     ) -> tuple[np.ndarray, int]:
    """One round's summed statistics of ``name`` (H, F+1, F+1), and how many updates were
    clipped.  ``prev`` is the accumulated statistics before the round.

    Each update is a per-horizon count ``n`` (``S[:, 0, 0]``) and mean statistics
    ``G = S / n``; see the module docstring for the rules.
    """
    sums = [np.asarray(u.delta[name], dtype=float) for u, _ in rows]
    factors = np.array([f for _, f in rows])
    robust = config.method != "fedavg"
    multiple = config.clip_median_multiple
    if not robust and config.clip_norm is None and multiple is None:
        return np.asarray(sum(f * S for f, S in zip(factors, sums, strict=True))), 0
    if robust and multiple is None and config.clip_norm is None:
        multiple = 1.0  # a robust method always bounds each update around its centre
    counts = np.stack([S[:, 0, 0] for S in sums])  # (U, H)
    with np.errstate(invalid="ignore", divide="ignore"):
        G = np.stack([np.where(n[:, None, None] != 0, S / n[:, None, None], np.nan)
                      for S, n in zip(sums, counts, strict=True)])
    ok = np.all(np.isfinite(G.reshape(len(sums), -1)), axis=1)
    G, counts, factors = G[ok], counts[ok], factors[ok]
    if not len(G):
        return np.zeros_like(sums[0]), 0
    # The centre each update is clipped around: the global statistics so far (as weight
    # deltas are clipped around the global weights), or the round's robust centre.
    if robust:
        center = _robust(G, config.method, config.trim_fraction)
    elif prev is not None and np.all(prev[:, 0, 0] > 0):
        center = prev / prev[:, :1, :1]
    else:
        center = np.median(G, axis=0)
    dev = G - center
    norms = np.sqrt((dev ** 2).sum(axis=(1, 2, 3)))
    bound = config.clip_norm
    if multiple is not None:
        adaptive = multiple * float(np.median(norms))
        bound = adaptive if bound is None else min(bound, adaptive)
    assert bound is not None
    scale = np.where(norms > bound, bound / np.maximum(norms, 1e-300), 1.0)
    G = center + dev * scale[:, None, None, None]
    # Counts (the weights) within [0, multiple x the round's median count].
    cap = (multiple or 3.0) * np.median(counts, axis=0)
    n_eff = np.clip(counts, 0.0, np.maximum(cap, 0.0)[None, :]) * factors[:, None]
    clipped = int(((norms > bound) | np.any(n_eff != counts * factors[:, None], axis=1)).sum())
    metrics[f"clip_bound.{name}"] = float(bound)
    metrics[f"median_norm.{name}"] = float(np.median(norms))
    tot = n_eff.sum(axis=0)  # (H,)
    safe = np.where(tot > 0, tot, 1.0)
    mean = np.einsum("uh,uhij->hij", n_eff, G) / safe[:, None, None]
    if config.noise_multiplier > 0:
        share = float((n_eff / safe).max())
        sigma = config.noise_multiplier * bound * share
        noise = rng.normal(0.0, sigma, size=mean.shape)
        mean = mean + (noise + np.swapaxes(noise, -1, -2)) / 2
        metrics[f"noise_std.{name}"] = sigma
    return mean * tot[:, None, None], clipped


def merge_stats(items: Sequence[tuple[float, Params]], method: str = "fedavg",
                trim: float = 0.25) -> Params:
    """Merge statistics of several edges, weighted by their sample counts.

    ``x_var`` is pooled with ``x_mean``: mean of within-edge variances plus the variance of
    the means (the exact pooled variance); everything else is an ``n``-weighted mean,
    ignoring NaN (a candidate an edge never scored).  Robust methods take the coordinate-wise
    median / trimmed mean instead.

    >>> a = {"x_mean": np.array([0.0]), "x_var": np.array([1.0])}
    >>> b = {"x_mean": np.array([2.0]), "x_var": np.array([1.0])}
    >>> m = merge_stats([(1, a), (1, b)])
    >>> m["x_mean"].tolist(), m["x_var"].tolist()
    ([1.0], [2.0])
    """
    names = sorted({k for _, s in items for k in s})
    out: Params = {}
    for name in names:
        rows = [(float(n), np.asarray(s[name], dtype=float)) for n, s in items
                if name in s and n > 0]
        if not rows:
            continue
        shape = rows[0][1].shape
        rows = [(n, v) for n, v in rows if v.shape == shape]
        vals = np.stack([v for _, v in rows])
        if method != "fedavg":
            with np.errstate(invalid="ignore"):
                out[name] = _robust(np.where(np.isfinite(vals), vals, np.nan), method, trim)
            continue
        ns = np.array([n for n, _ in rows]).reshape((-1,) + (1,) * len(shape))
        ok = np.isfinite(vals)
        wsum = (ns * ok).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (ns * np.where(ok, vals, 0.0)).sum(axis=0) / wsum
        if name == "x_var" and "x_mean" in names:
            means = np.stack([np.asarray(s["x_mean"], dtype=float) for n, s in items
                              if "x_var" in s and n > 0 and np.shape(s["x_var"]) == shape])
            mu = (ns * means).sum(axis=0) / ns.sum(axis=0)
            mean = mean + (ns * (means - mu) ** 2).sum(axis=0) / ns.sum(axis=0)
        out[name] = np.where(wsum > 0, mean, np.nan)
    return out


def aggregate(state: GlobalState, updates: Sequence[ModelDelta], config: AggregationConfig,
              now_ms: int = 0, rng: np.random.Generator | None = None) -> Aggregation:
    """The next version of ``state`` from one round's ``updates`` (pure).

    Updates of another family, with a wrong shape, non-finite values or too stale a base
    are left out (``rejected`` says why); the version advances even if all were rejected.
    """
    rng = rng or np.random.default_rng(config.seed)
    rejected: dict[str, str] = {}
    kept: list[tuple[ModelDelta, float]] = []
    for u in updates:
        factor = staleness_weight(u.base_version, state.version, config.max_staleness,
                                  config.staleness_decay)
        if u.family != state.family:
            rejected[u.edge_id] = f"family {u.family!r} is not {state.family!r}"
        elif factor is None:
            rejected[u.edge_id] = (f"stale: built on version {u.base_version}, current is "
                                   f"{state.version} (max staleness {config.max_staleness})")
        elif any(k in state.params and v.shape != state.params[k].shape
                 for k, v in u.delta.items()):
            rejected[u.edge_id] = "parameter shapes do not match the global model"
        elif not all(np.all(np.isfinite(v)) for v in u.delta.values()):
            rejected[u.edge_id] = "non-finite values in the delta"
        else:
            kept.append((u, factor))
    params = {k: v.copy() for k, v in state.params.items()}
    samples = dict(state.samples)
    metrics: dict[str, float] = {"updates": float(len(updates)), "rejected": float(len(rejected))}
    names = sorted({k for u, _ in kept for k in u.delta})
    clipped_total = 0
    for name in (n for n in names if n in STAT_PARAMS):
        rows = [(u, f) for u, f in kept if name in u.delta and u.n(name) > 0]
        if not rows:
            continue
        prev = params.get(name)
        rnd, clipped_n = _aggregate_stats(name, rows, config, rng, metrics, prev)
        clipped_total += clipped_n
        total = rnd if prev is None else config.stats_decay * prev + rnd
        params[name] = total
        params[STAT_PARAMS[name]] = solve_weights(total, config.ridge)
        samples[name] = round(float(total[0, 0, 0]))
        samples[STAT_PARAMS[name]] = samples[name]
    for name in names:
        if name in STAT_PARAMS:
            continue
        stat = next((k for k, w in STAT_PARAMS.items() if w == name), None)
        if stat is not None and stat in params:
            continue  # solved from the statistics, not averaged
        rows = [(u, f) for u, f in kept if name in u.delta and u.n(name) > 0]
        if not rows:
            continue
        deltas = [np.asarray(u.delta[name], dtype=float) for u, _ in rows]
        norms = [float(np.linalg.norm(d)) if np.all(np.isfinite(d)) else math.inf
                 for d in deltas]
        bound = config.clip_norm
        finite = [n for n in norms if math.isfinite(n)]
        if config.clip_median_multiple is not None and finite:
            adaptive = config.clip_median_multiple * float(np.median(finite))
            bound = adaptive if bound is None else min(bound, adaptive)
        clipped = []
        for d in deltas:
            c, _, was = clip_by_norm(d, bound)
            clipped.append(c)
            clipped_total += was
        weights = np.array([u.n(name) * f for u, f in rows], dtype=float)
        stack = np.stack(clipped)
        if config.method == "fedavg":
            share = weights / weights.sum()
            step = np.tensordot(share, stack, axes=1)
            if config.noise_multiplier > 0 and bound is not None:
                sigma = config.noise_multiplier * bound * float(share.max())
                step = step + rng.normal(0.0, sigma, size=step.shape)
                metrics[f"noise_std.{name}"] = sigma
        else:
            step = _robust(stack, config.method, config.trim_fraction)
        base = params.get(name)
        params[name] = (np.zeros_like(step) if base is None else base) + step
        samples[name] = samples.get(name, 0) + int(sum(u.n(name) for u, _ in rows))
        metrics[f"median_norm.{name}"] = float(np.median(finite)) if finite else math.nan
        if bound is not None:
            metrics[f"clip_bound.{name}"] = bound
    metrics["clipped"] = float(clipped_total)
    stats = merge_stats([(u.num_samples * f, u.stats) for u, f in kept if u.stats],
                        config.method, config.trim_fraction)
    merged_stats = {**state.stats, **stats}
    errs = [(u.num_samples, u.validation_error) for u, _ in kept
            if u.validation_error is not None and math.isfinite(u.validation_error)]
    if errs:
        metrics["validation_error"] = (sum(n * e for n, e in errs)
                                       / max(1, sum(n for n, _ in errs)))
    version = state.version + 1
    new = GlobalState(
        family=state.family, version=version, params=params, stats=merged_stats,
        samples=samples, round=version, aggregation=config.method,
        participants=sorted(u.edge_id for u, _ in kept),
        num_samples=int(sum(u.num_samples for u, _ in kept)),
        metrics={k: v for k, v in metrics.items() if math.isfinite(v)}, created_at=now_ms,
    )
    return Aggregation(new, rejected)


# ----------------------------------------------------------------------------- rounds


@dataclass
class _Round:
    opened_at: float
    updates: dict[str, ModelDelta] = field(default_factory=dict)


class RoundCoordinator:
    """Round bookkeeping per family (pure): every accepted update joins the family's open
    round (a late one built on an older version is down-weighted, see
    :func:`staleness_weight`; one for a future round is rejected, and so is a re-send for
a closed round that already includes the edge); a round closes
    (``min_updates`` distinct edges, or ``round_timeout`` seconds after its
    first update), and the aggregate it closes with.

    >>> import numpy as np
    >>> c = RoundCoordinator(AggregationConfig(), min_updates=2, round_timeout=60)
    >>> d = {"weights": np.ones((1, 2))}
    >>> c.offer(ModelDelta("a", "f", 1, 0, 10, d), now=0.0)
    []
    >>> [s.version for s in c.offer(ModelDelta("b", "f", 1, 0, 10, d), now=1.0)]
    [1]
    """

    def __init__(self, config: AggregationConfig, *, min_updates: int = 2,
                 round_timeout: float = 300.0) -> None:
        if min_updates < 1 or round_timeout <= 0:
            raise ValueError("min_updates must be >= 1 and round_timeout > 0")
        self.config = config
        self.min_updates = min_updates
        self.round_timeout = round_timeout
        self.models: dict[str, GlobalState] = {}
        self._rounds: dict[str, _Round] = {}
        self._rng = np.random.default_rng(config.seed)
        self.rejected: list[tuple[str, str]] = []  # (edge_id, reason), most recent last

    def restore(self, state: GlobalState) -> None:
        """Continue from a published version (at start-up, from the repository)."""
        cur = self.models.get(state.family)
        if cur is None or state.version > cur.version:
            self.models[state.family] = state

    def _reject(self, edge: str, reason: str) -> None:
        self.rejected.append((edge, reason))
        del self.rejected[:-1000]

    def offer(self, update: ModelDelta, now: float) -> list[GlobalState]:
        """Take one update; returns the versions it completed (zero or one)."""
        state = self.models.get(update.family)
        if state is None:  # version 0: zeros shaped like the first update
            state = GlobalState(update.family, 0,
                                {k: np.zeros_like(v) for k, v in update.delta.items()})
            self.models[update.family] = state
        want = state.version + 1
        if update.round > want:
            self._reject(update.edge_id, f"round {update.round}: the open round is {want}")
            return []
        if update.round == state.version and update.edge_id in state.participants:
            # A re-send that arrived after its round closed: its rows are in already
            # (statistics must not be counted twice).
            self._reject(update.edge_id, f"round {update.round} already includes this edge")
            return []
        if staleness_weight(update.base_version, state.version, self.config.max_staleness,
                            self.config.staleness_decay) is None:
            self._reject(update.edge_id, f"stale base version {update.base_version}")
            return []
        rnd = self._rounds.setdefault(update.family, _Round(opened_at=now))
        rnd.updates[update.edge_id] = update  # a re-sent update replaces the earlier one
        if len(rnd.updates) >= self.min_updates:
            return [self._close(update.family, now)]
        return []

    def due(self, now: float) -> list[GlobalState]:
        """Close the rounds whose deadline passed (call every second or so)."""
        return [self._close(fam, now) for fam, r in list(self._rounds.items())
                if r.updates and now - r.opened_at >= self.round_timeout]

    def pending(self, family: str) -> int:
        r = self._rounds.get(family)
        return len(r.updates) if r else 0

    def _close(self, family: str, now: float) -> GlobalState:
        rnd = self._rounds.pop(family)
        result = aggregate(self.models[family], list(rnd.updates.values()), self.config,
                           now_ms=round(now * 1000), rng=self._rng)
        for edge, reason in result.rejected.items():
            self._reject(edge, reason)
        self.models[family] = result.state
        return result.state


# ----------------------------------------------------------------------------- cold start


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
    load_weights(inner, w, {k: state.stats[k] for k in _SCALER if k in state.stats})
    k = float(prior_samples or inner.season)
    inner.set_prior(covariance=_prior(state.params, "gram", k, fallback_prior))
    return True


def _seed(f: DirectForecaster, errors: np.ndarray | None, pseudo_count: float | None) -> None:
    """Seed the selector with the federation's cold-start errors (see warm_start)."""
    H, C = f.max_horizon, len(CANDIDATES)
    e = np.full((H, C), np.nan) if errors is None else np.asarray(errors, dtype=float)
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
            self.mature_stats = {k: state.stats[k] for k in _SCALER if k in state.stats}
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
    scaler = {k: stats[k] for k in _SCALER if k in stats}
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


# ----------------------------------------------------------------------------- Avro


#: Statistics whose missing entries (NaN here) travel as -1: Avro values must be finite.
_NEGATIVE_IS_MISSING = ("cold_errors",)


def _stats_to_avro(name: str, sums: np.ndarray) -> list[dict[str, Any]]:
    """Row sums (H, F+1, F+1) as one parameter per horizon ``name[h]`` (0-based): the row
    count in ``num_samples``, the values are the means (first row) and covariance (the
    rest, F x F) of the row values after the constant 1: no count, no constant."""
    out = []
    for h, S in enumerate(np.asarray(sums, dtype=float)):
        n = float(S[0, 0])
        if n != 0:
            mu = S[0, 1:] / n
            cov = S[1:, 1:] / n - np.outer(mu, mu)
        else:
            mu, cov = np.zeros(S.shape[0] - 1), np.zeros((S.shape[0] - 1,) * 2)
        v = np.vstack([mu[None, :], cov])
        out.append({"name": f"{name}[{h}]", "values": [float(x) for x in v.ravel()],
                    "shape": [int(d) for d in v.shape], "num_samples": round(n)})
    return out


def _stats_from_avro(rows: Mapping[int, Mapping[str, Any]]) -> np.ndarray:
    """Inverse of :func:`_stats_to_avro` (horizon -> decoded ModelParameter)."""
    if sorted(rows) != list(range(len(rows))):
        raise ValueError(f"statistics: horizons {sorted(rows)} are not 0..{len(rows) - 1}")
    out = []
    for h in range(len(rows)):
        p = rows[h]
        v = np.asarray(p["values"], dtype=float)
        shape = tuple(p.get("shape") or ())
        if len(shape) != 2 or shape[0] != shape[1] + 1 or math.prod(shape) != v.size:
            raise ValueError(f"statistics {p['name']}: bad shape {shape} for {v.size} values")
        v = v.reshape(shape)
        n = float(p.get("num_samples") or 0)
        mu, cov = v[0], v[1:]
        S = np.empty((shape[0], shape[0]))
        S[0, 0] = n
        S[0, 1:] = S[1:, 0] = n * mu
        S[1:, 1:] = n * (cov + np.outer(mu, mu))
        out.append(S)
    return np.stack(out)


def _to_avro(params: Mapping[str, np.ndarray], samples: Mapping[str, int] | None = None
             ) -> list[dict[str, Any]]:
    out = []
    for name in sorted(params):
        if name in STAT_PARAMS:
            out.extend(_stats_to_avro(name, params[name]))
            continue
        v = np.asarray(params[name], dtype=float)
        if name in _NEGATIVE_IS_MISSING:
            v = np.where(np.isfinite(v) & (v >= 0), v, -1.0)
        out.append({"name": name, "values": [float(x) for x in v.ravel()],
                    "shape": [int(d) for d in v.shape],
                    "num_samples": None if samples is None or name not in samples
                    else int(samples[name])})
    return out


def _from_avro(items: Iterable[Mapping[str, Any]]) -> tuple[Params, dict[str, int]]:
    params: Params = {}
    samples: dict[str, int] = {}
    stat_rows: dict[str, dict[int, Mapping[str, Any]]] = {}
    for p in items:
        base, _, idx = str(p["name"]).partition("[")
        if base in STAT_PARAMS and idx.endswith("]") and idx[:-1].isdigit():
            stat_rows.setdefault(base, {})[int(idx[:-1])] = p
            continue
        v = np.asarray(p["values"], dtype=float)
        shape = tuple(p.get("shape") or ())
        if shape:
            if math.prod(shape) != v.size:
                raise ValueError(f"parameter {p['name']}: {v.size} values for shape {shape}")
            v = v.reshape(shape)
        if p["name"] in _NEGATIVE_IS_MISSING:
            v = np.where(v >= 0, v, np.nan)
        params[p["name"]] = v
        if p.get("num_samples") is not None:
            samples[p["name"]] = int(p["num_samples"])
    for name, rows in stat_rows.items():
        params[name] = _stats_from_avro(rows)
        samples[name] = round(float(params[name][0, 0, 0]))
    return params, samples


def update_to_record(u: ModelDelta, created_at_ms: int) -> dict[str, Any]:
    """The ModelUpdate Avro dict of ``u``."""
    return {
        "family": u.family, "edge_id": u.edge_id, "round": u.round,
        "base_version": u.base_version, "created_at": created_at_ms,
        "num_samples": int(u.num_samples), "validation_mae": u.validation_error,
        "delta": _to_avro(u.delta, u.samples), "scaler": _to_avro(u.stats),
    }


def update_from_record(r: Mapping[str, Any]) -> ModelDelta:
    """A decoded ModelUpdate dict -> :class:`ModelDelta` (ValueError on bad shapes)."""
    delta, samples = _from_avro(r["delta"])
    stats, _ = _from_avro(r.get("scaler") or [])
    return ModelDelta(r["edge_id"], r["family"], int(r["round"]), int(r["base_version"]),
                      int(r["num_samples"]), delta, samples, stats, r.get("validation_mae"))


def global_to_record(s: GlobalState) -> dict[str, Any]:
    """The GlobalModel Avro dict of ``s``."""
    return {
        "family": s.family, "version": s.version, "round": s.round,
        "created_at": s.created_at, "aggregation": s.aggregation,
        "participants": list(s.participants), "num_samples": int(s.num_samples),
        "params": _to_avro(s.params, s.samples), "scaler": _to_avro(s.stats),
        "metrics": {k: float(v) for k, v in s.metrics.items()},
    }


def global_from_record(r: Mapping[str, Any]) -> GlobalState:
    """A decoded GlobalModel dict -> :class:`GlobalState`."""
    params, samples = _from_avro(r["params"])
    stats, _ = _from_avro(r.get("scaler") or [])
    return GlobalState(
        family=r["family"], version=int(r["version"]), params=params, stats=stats,
        samples=samples, round=int(r["round"]), aggregation=r["aggregation"],
        participants=list(r["participants"]), num_samples=int(r["num_samples"]),
        metrics=dict(r.get("metrics") or {}), created_at=int(r["created_at"]),
    )


def with_version(state: GlobalState, version: int) -> GlobalState:
    """A copy of ``state`` with another version number (tests, tools)."""
    return replace(state, version=version)


#: Candidate names of the selector, in the column order of ``cold_errors``.
COLD_ERROR_COLUMNS = CANDIDATES
