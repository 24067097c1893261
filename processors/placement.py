"""Placement: N demand sources x M targets with capacities and a cost per pair -> the
assignment of least total cost that no target's capacity can hold less than.

Values in, values out (numpy arrays); every solve is exact and done by a kept solver:

- **indivisible, equal demands** (every source is one unit of the same size, e.g. tenants
  of one class): a target of capacity ``c`` holds ``floor(c / d)`` sources ("slots").
  With at most one slot per target, or few slots in all, it is a rectangular assignment
  problem: :func:`scipy.optimize.linear_sum_assignment` on the cost matrix with one
  column per slot. With many slots it is a transportation problem with integer supplies
  and capacities, solved by the network simplex of POT (``ot.emd``), whose optimal
  vertex is integral (the constraint matrix is totally unimodular): still one target per
  source.
- **split** (``split=True``: a source's demand may be divided among targets): the
  transportation problem, by the network simplex of POT with a slack source that takes
  the unused capacity at no cost. The answer has the fraction of each source per target.
- **indivisible, unequal demands**: the generalized assignment problem (NP-hard), as a
  mixed-integer program by :func:`scipy.optimize.milp` (HiGHS), within ``time_limit_s``;
  the answer says whether optimality was proven. Callers bound its size.

``cost[i, j]`` is the cost of one unit of source ``i``'s demand on target ``j`` (latency
in ms per request, money per rps, ...); the total is ``sum(demand_i * share_ij *
cost_ij)``. ``inf`` (or NaN) marks a pair that is not allowed. Infeasible input raises
:class:`PlacementInfeasible` saying by how much.

>>> import numpy as np
>>> cost = np.array([[1.0, 5.0], [2.0, 1.0], [1.0, 3.0]])
>>> p = solve_placement(np.array([1.0, 1.0, 1.0]), np.array([2.0, 1.0]), cost)
>>> p.method, p.target.tolist(), p.total_cost
('assignment', [0, 1, 0], 3.0)
>>> p.utilization.tolist()
[1.0, 1.0]
>>> solve_placement(np.array([2.0, 2.0]), np.array([1.0, 1.0]), cost[:2])
Traceback (most recent call last):
...
processors.placement.PlacementInfeasible: total demand 4 is over total capacity 2 by 2
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp
from scipy.sparse import coo_matrix

Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Rectangular assignment with slot columns is O(N^2 K) for K columns: above this many
# columns the network simplex is faster (measured: benchmarks/placement.py).
MAX_SLOT_COLUMNS = 8000
# A forbidden pair costs this many times the spread of the allowed costs in the network
# simplex, so any mass on it means no placement within the allowed pairs exists.
FORBIDDEN_WEIGHT = 1e6
TOLERANCE = 1e-9


class PlacementInfeasible(ValueError):
    """No placement fits: ``shortfall`` demand units cannot be placed; ``source`` is the
    index of a source that fits nowhere, when that is the reason."""

    def __init__(self, message: str, shortfall: float, source: int | None = None) -> None:
        super().__init__(message)
        self.shortfall = shortfall
        self.source = source


@dataclass(frozen=True)
class Placement:
    """The optimal placement.

    ``target[i]`` is source ``i``'s target (indivisible modes; -1 when split);
    ``share[i, j]`` its fraction on target ``j`` (rows sum to 1); ``load[j]`` the demand
    placed on ``j``; ``utilization[j]`` = load / capacity (0 for capacity 0)."""

    method: str  # assignment | transport | gap-milp
    target: IntArray
    share: Array
    total_cost: float
    load: Array
    utilization: Array
    optimal: bool
    solve_seconds: float


def _check(demand: Array, capacity: Array, cost: Array) -> Array:
    n, m = len(demand), len(capacity)
    if cost.shape != (n, m):
        raise ValueError(f"cost is {cost.shape[0]} x {cost.shape[1]}, expected {n} x {m}")
    if n == 0 or m == 0:
        raise ValueError("need at least one source and one target")
    if not (np.all(np.isfinite(demand)) and np.all(demand >= 0)):
        raise ValueError("demands must be finite and >= 0")
    if not (np.all(np.isfinite(capacity)) and np.all(capacity >= 0)):
        raise ValueError("capacities must be finite and >= 0")
    if np.any(cost == -np.inf):
        raise ValueError("cost must not be -inf")
    nan = np.isnan(cost)
    return np.where(nan, np.inf, cost) if nan.any() else cost


def _check_totals(demand: Array, capacity: Array, allowed: npt.NDArray[np.bool_]) -> None:
    total, cap = float(demand.sum()), float(capacity.sum())
    if total > cap * (1 + TOLERANCE) + TOLERANCE:
        raise PlacementInfeasible(
            f"total demand {total:g} is over total capacity {cap:g} by {total - cap:g}",
            total - cap)
    for i in np.flatnonzero(~allowed.any(axis=1)):
        raise PlacementInfeasible(f"source {i} has no allowed target", float(demand[i]), int(i))


def equal_demands(demand: Array) -> bool:
    """True when every source has the same (positive) demand: the assignment mode."""
    return bool(demand[0] > 0 and np.allclose(demand, demand[0], rtol=TOLERANCE, atol=0.0))


def solve_placement(demand: Array, capacity: Array, cost: Array, *, split: bool = False,
                    time_limit_s: float = 10.0) -> Placement:
    """The least-cost placement of ``demand`` (N) on ``capacity`` (M) at ``cost`` (N x M,
    per unit of demand, inf = not allowed); see the module docstring for the modes.
    Raises :class:`PlacementInfeasible` (with the shortfall) or ValueError (bad input)."""
    started = time.perf_counter()
    demand = np.asarray(demand, dtype=np.float64)
    capacity = np.asarray(capacity, dtype=np.float64)
    cost = _check(demand, capacity, np.asarray(cost, dtype=np.float64))
    allowed = np.isfinite(cost)
    _check_totals(demand, capacity, allowed)
    if split:
        method, share, optimal = "transport", _transport(demand, capacity, cost, allowed), True
    elif equal_demands(demand):
        method, optimal = "assignment", True
        share = _unit(float(demand[0]), capacity, cost, allowed)
    else:
        method = "gap-milp"
        share, optimal = _gap(demand, capacity, cost, allowed, time_limit_s)
    target = np.where(split, -1, share.argmax(axis=1)).astype(np.int64)
    load = demand @ share
    with np.errstate(divide="ignore", invalid="ignore"):
        util = np.where(capacity > 0, load / capacity, 0.0)
    rows, cols = np.nonzero(share)  # only placed pairs: forbidden ones hold inf
    total = float(np.sum(demand[rows] * share[rows, cols] * cost[rows, cols]))
    return Placement(method, target, share, total, load, util, optimal,
                     time.perf_counter() - started)


def _unit(d: float, capacity: Array, cost: Array,
          allowed: npt.NDArray[np.bool_]) -> Array:
    """Equal indivisible demands: assignment with slot columns, or the integral network
    simplex when the slots are many."""
    n, m = cost.shape
    slots = np.minimum(np.floor(capacity / d * (1 + TOLERANCE)), n).astype(np.int64)
    if slots.sum() < n:
        short = (n - int(slots.sum())) * d
        raise PlacementInfeasible(
            f"{n} sources of {d:g} need {n} slots, the capacities hold {int(slots.sum())}: "
            f"short by {short:g}", short)
    share = np.zeros((n, m))
    if slots.sum() <= max(MAX_SLOT_COLUMNS, n) or slots.max() <= 1:
        columns = np.repeat(np.arange(m), slots)
        # one slot everywhere: the matrix as it is (no copy)
        matrix = cost if np.all(slots == 1) else cost[:, columns]
        try:
            rows, cols = linear_sum_assignment(matrix)
        except ValueError:
            raise PlacementInfeasible(
                "no assignment of every source to an allowed target within the "
                "capacities", d) from None
        share[rows, columns[cols]] = 1.0
        return share
    flow = _network_simplex(np.ones(n), slots.astype(np.float64), cost, allowed)
    share[np.arange(n), flow.argmax(axis=1)] = 1.0  # integral: one 1 per row
    return share


def _transport(demand: Array, capacity: Array, cost: Array,
               allowed: npt.NDArray[np.bool_]) -> Array:
    """Splittable demands: the transportation problem; shares per source."""
    flow = _network_simplex(demand, capacity, cost, allowed)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(demand[:, None] > 0, flow / demand[:, None], 0.0)
    zero = demand <= 0  # a source without demand: its cheapest allowed target
    if zero.any():
        share[zero] = 0.0
        share[zero, np.where(allowed[zero], cost[zero], np.inf).argmin(axis=1)] = 1.0
    return share


def _network_simplex(supply: Array, capacity: Array, cost: Array,
                     allowed: npt.NDArray[np.bool_]) -> Array:
    """Min-cost transport of ``supply`` into ``capacity`` (POT's network simplex); the
    unused capacity goes to a slack row at no cost. Flow on a forbidden pair, priced far
    above any allowed one, is the demand that fits nowhere."""
    import ot  # imported here: a second of start-up that only this mode needs

    finite = cost[allowed]
    spread = float(finite.max() - finite.min()) + 1.0 if finite.size else 1.0
    big = (float(finite.max()) if finite.size else 0.0) + FORBIDDEN_WEIGHT * spread
    priced = np.where(allowed, cost, big)
    slack = float(capacity.sum() - supply.sum())
    a = np.append(supply, max(slack, 0.0))
    b = capacity.copy()
    b[-1] += a.sum() - b.sum()  # remove float residue: the marginals must match exactly
    matrix = np.vstack([priced, np.zeros((1, cost.shape[1]))])
    plan, log = ot.emd(a, b, matrix, numItermax=max(100_000, 50 * a.size * b.size),
                       log=True, check_marginals=False)
    if log.get("warning"):
        raise ValueError(f"transport solver did not finish: {log['warning']}")
    flow: Array = plan[:-1]
    misplaced = float(flow[~allowed].sum())
    if misplaced > TOLERANCE * max(1.0, float(supply.sum())):
        raise PlacementInfeasible(
            f"{misplaced:g} of the demand fits no allowed target within the capacities",
            misplaced)
    return np.where(allowed, flow, 0.0)


def _gap(demand: Array, capacity: Array, cost: Array, allowed: npt.NDArray[np.bool_],
         time_limit_s: float) -> tuple[Array, bool]:
    """Unequal indivisible demands: the generalized assignment problem by HiGHS' MILP."""
    n, m = cost.shape
    fits = allowed & (demand[:, None] <= capacity[None, :] * (1 + TOLERANCE) + TOLERANCE)
    for i in range(n):
        if not fits[i].any():
            raise PlacementInfeasible(
                f"source {i} (demand {demand[i]:g}) fits no allowed target", float(demand[i]), i)
    rows, cols = np.nonzero(fits)
    k = len(rows)
    c = demand[rows] * cost[rows, cols]
    one_each = coo_matrix((np.ones(k), (rows, np.arange(k))), shape=(n, k))
    within = coo_matrix((demand[rows], (cols, np.arange(k))), shape=(m, k))
    res = milp(c, integrality=np.ones(k), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1),
                            LinearConstraint(within, -np.inf, capacity)],
               options={"time_limit": time_limit_s})
    if res.x is None:
        if res.status == 2:
            raise PlacementInfeasible(
                "no assignment of the indivisible sources fits the capacities "
                "(each source fits somewhere, but not all together)", 0.0)
        raise ValueError(f"no placement found within {time_limit_s:g} s: {res.message}")
    share = np.zeros((n, m))
    share[rows, cols] = np.round(res.x)
    return share, bool(res.status == 0)
