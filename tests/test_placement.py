"""processors.placement: every mode equals the optimum found by brute force (indivisible)
or by an independent LP (split) on small random cases, and respects the capacities."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.optimize import linprog

from processors import placement as pl
from processors.placement import PlacementInfeasible, solve_placement


def brute_force(demand: np.ndarray, capacity: np.ndarray, cost: np.ndarray) -> float | None:
    """Least total cost over every assignment of sources to targets (None: none fits)."""
    n, m = cost.shape
    best = None
    for choice in itertools.product(range(m), repeat=n):
        load = np.zeros(m)
        total = 0.0
        for i, j in enumerate(choice):
            if not np.isfinite(cost[i, j]):
                break
            load[j] += demand[i]
            total += demand[i] * cost[i, j]
        else:
            if np.all(load <= capacity + 1e-9) and (best is None or total < best):
                best = total
    return best


def check_capacities(p: pl.Placement, demand: np.ndarray, capacity: np.ndarray) -> None:
    assert np.allclose(p.share.sum(axis=1), 1.0)
    assert np.all(p.load <= capacity * (1 + 1e-7) + 1e-7)
    assert np.allclose(p.load, demand @ p.share)


def random_case(rng: np.random.Generator, unit: bool) -> tuple[np.ndarray, ...]:
    n, m = int(rng.integers(1, 6)), int(rng.integers(1, 4))
    demand = np.full(n, 2.0) if unit else rng.integers(1, 6, n).astype(float)
    capacity = rng.integers(0, 9, m).astype(float)
    cost = rng.integers(0, 20, (n, m)).astype(float)
    cost[rng.random((n, m)) < 0.15] = np.inf  # some pairs not allowed
    return demand, capacity, cost


@pytest.mark.parametrize("unit", [True, False], ids=["equal-demands", "unequal-demands"])
def test_indivisible_equals_brute_force(unit: bool) -> None:
    rng = np.random.default_rng(7 if unit else 8)
    solved = infeasible = milp = 0
    for _ in range(150):
        demand, capacity, cost = random_case(rng, unit)
        best = brute_force(demand, capacity, cost)
        try:
            p = solve_placement(demand, capacity, cost)
        except PlacementInfeasible as e:
            assert best is None, f"solver says infeasible ({e}), brute force found {best}"
            infeasible += 1
            continue
        assert best is not None
        equal = bool(np.all(demand == demand[0]))
        assert p.method == ("assignment" if equal else "gap-milp") and p.optimal
        assert p.total_cost == pytest.approx(best)
        assert np.all(np.isfinite(cost[np.arange(len(demand)), p.target]))
        check_capacities(p, demand, capacity)
        solved += 1
        milp += p.method == "gap-milp"
    assert solved > 40 and infeasible > 10  # both outcomes were exercised
    assert unit or milp > 20


def test_many_slots_take_the_network_simplex(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    calls = []
    simplex = pl._network_simplex
    monkeypatch.setattr(pl, "MAX_SLOT_COLUMNS", 0)
    monkeypatch.setattr(pl, "_network_simplex",
                        lambda *a: calls.append(1) or simplex(*a))  # type: ignore[func-returns-value]
    for _ in range(40):
        demand, capacity, cost = random_case(rng, unit=True)
        best = brute_force(demand, capacity, cost)
        try:
            p = solve_placement(demand, capacity, cost)
        except PlacementInfeasible:
            assert best is None
            continue
        assert best is not None and p.total_cost == pytest.approx(best)
        assert set(np.unique(p.share)) <= {0.0, 1.0}
        check_capacities(p, demand, capacity)
    assert len(calls) > 10  # the network simplex did solve most of them


def test_split_equals_lp() -> None:
    rng = np.random.default_rng(11)
    for _ in range(60):
        n, m = int(rng.integers(1, 7)), int(rng.integers(1, 5))
        demand = rng.uniform(0, 10, n)
        capacity = rng.uniform(0, 10, m)
        cost = rng.uniform(0, 5, (n, m))
        cost[rng.random((n, m)) < 0.1] = np.inf
        ok = np.isfinite(cost)
        # the reference: the same transport problem as an LP over the allowed pairs
        rows, cols = np.nonzero(ok)
        a_eq = np.zeros((n, len(rows)))
        a_eq[rows, np.arange(len(rows))] = 1
        a_ub = np.zeros((m, len(rows)))
        a_ub[cols, np.arange(len(rows))] = 1
        ref = linprog(cost[rows, cols], A_ub=a_ub, b_ub=capacity, A_eq=a_eq, b_eq=demand,
                      method="highs")
        try:
            p = solve_placement(demand, capacity, cost, split=True)
        except PlacementInfeasible:
            assert ref.status == 2
            continue
        assert ref.status == 0 and p.method == "transport"
        assert p.total_cost == pytest.approx(ref.fun, rel=1e-6, abs=1e-6)
        check_capacities(p, demand, capacity)
        assert np.all(p.share[~ok] == 0)


def test_infeasible_says_by_how_much() -> None:
    with pytest.raises(PlacementInfeasible, match="by 5") as e:
        solve_placement(np.array([10.0, 5.0]), np.array([4.0, 6.0]), np.zeros((2, 2)),
                        split=True)
    assert e.value.shortfall == pytest.approx(5.0)
    with pytest.raises(PlacementInfeasible, match="source 1 has no allowed target") as e:
        solve_placement(np.array([1.0, 1.0]), np.array([4.0, 6.0]),
                        np.array([[1.0, 2.0], [np.inf, np.nan]]))
    assert e.value.source == 1
    # three units of 2 into capacities 3 + 3: total fits, slots do not (one short)
    with pytest.raises(PlacementInfeasible, match="short by 2"):
        solve_placement(np.full(3, 2.0), np.array([3.0, 3.0]), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="expected 2 x 2"):
        solve_placement(np.ones(2), np.ones(2), np.zeros((2, 3)))
