"""Federated models on the wire: ModelUpdate / GlobalModel records and their pure values.

:class:`ModelDelta` (one edge's update for one round) and :class:`GlobalState` (one version
of a family's global model) are the values :mod:`processors.federated` computes with; this
module converts them to and from the decoded Avro dicts of ``ModelUpdate.avsc`` and
``GlobalModel.avsc``.  Sufficient statistics (``gram``, ``cold_gram``: per-horizon row sums,
see :mod:`processors.federated`) travel as one parameter per horizon ``name[h]``: the row
count in ``num_samples``, the values the means and covariance of the row values, so neither
a sum of raw products nor the constant leaves the edge.

>>> import numpy as np
>>> s = GlobalState("f", 2, {"weights": np.array([[0.5, 1.0]])}, samples={"weights": 30})
>>> back = global_from_record(global_to_record(s))
>>> back.version, back.params["weights"].tolist(), back.samples
(2, [[0.5, 1.0]], {'weights': 30})
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = [
    "STAT_PARAMS",
    "GlobalState",
    "ModelDelta",
    "Params",
    "global_from_record",
    "global_to_record",
    "update_from_record",
    "update_to_record",
    "with_version",
]

#: Sufficient statistics (row sums) and the weights solved from them.
STAT_PARAMS = {"gram": "weights", "cold_gram": "cold_weights"}
Params = dict[str, np.ndarray]


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
