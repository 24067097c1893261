"""One round's updates -> the next version of a family's global model (pure).

The rules (staleness, centred clipping, robust centres, noise) are described in
:mod:`processors.federated`.

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
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from processors.federated.statistics import DEFAULT_RIDGE, solve_weights
from schemas.federated import STAT_PARAMS, GlobalState, ModelDelta, Params

__all__ = [
    "AGGREGATIONS",
    "Aggregation",
    "AggregationConfig",
    "aggregate",
    "clip_by_norm",
    "merge_stats",
    "staleness_weight",
]

AGGREGATIONS = ("fedavg", "median", "trimmed-mean")


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


def _admit(state: GlobalState, updates: Sequence[ModelDelta], config: AggregationConfig
           ) -> tuple[list[tuple[ModelDelta, float]], dict[str, str]]:
    """(update, staleness factor) of the updates that count, and why the others do not."""
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
    return kept, rejected


def _average_deltas(name: str, rows: Sequence[tuple[ModelDelta, float]],
                    config: AggregationConfig, rng: np.random.Generator,
                    metrics: dict[str, float]) -> tuple[np.ndarray, int]:
    """One round's step of weight parameter ``name`` (the FedAvg way, each delta clipped),
    and how many deltas were clipped."""
    deltas = [np.asarray(u.delta[name], dtype=float) for u, _ in rows]
    norms = [float(np.linalg.norm(d)) if np.all(np.isfinite(d)) else math.inf
             for d in deltas]
    bound = config.clip_norm
    finite = [n for n in norms if math.isfinite(n)]
    if config.clip_median_multiple is not None and finite:
        adaptive = config.clip_median_multiple * float(np.median(finite))
        bound = adaptive if bound is None else min(bound, adaptive)
    clipped = []
    clipped_n = 0
    for d in deltas:
        c, _, was = clip_by_norm(d, bound)
        clipped.append(c)
        clipped_n += was
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
    metrics[f"median_norm.{name}"] = float(np.median(finite)) if finite else math.nan
    if bound is not None:
        metrics[f"clip_bound.{name}"] = bound
    return step, clipped_n


def aggregate(state: GlobalState, updates: Sequence[ModelDelta], config: AggregationConfig,
              now_ms: int = 0, rng: np.random.Generator | None = None) -> Aggregation:
    """The next version of ``state`` from one round's ``updates`` (pure).

    Updates of another family, with a wrong shape, non-finite values or too stale a base
    are left out (``rejected`` says why); the version advances even if all were rejected.
    """
    rng = rng or np.random.default_rng(config.seed)
    kept, rejected = _admit(state, updates, config)
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
        step, clipped_n = _average_deltas(name, rows, config, rng, metrics)
        clipped_total += clipped_n
        base = params.get(name)
        params[name] = (np.zeros_like(step) if base is None else base) + step
        samples[name] = samples.get(name, 0) + int(sum(u.n(name) for u, _ in rows))
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
