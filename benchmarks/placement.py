"""Speed of the placement optimizer (``processors.placement``) against SciPy alone.

Side by side in one run, on the same random cost matrices (uniform [0, 1), seeded):

- ``placement`` — :func:`processors.placement.solve_placement` with N equal indivisible
  sources and N targets of one slot each (the assignment mode: checks, slot columns,
  ``linear_sum_assignment``, loads, utilization, total cost);
- ``bare LSA`` — :func:`scipy.optimize.linear_sum_assignment` on the same matrix, nothing
  else (the baseline: the issue quotes it at about 70 ms for 1,000 x 1,000 here);
- ``slots x2`` — the same sources on N targets of two slots each (2N columns);
- ``split`` — splittable demands (uniform 1..10) on targets with 20 % spare capacity: the
  transportation problem by POT's network simplex;
- ``route`` — the whole ``POST /v1/optimize/placement`` in-process (aiohttp test client:
  JSON body of N x M costs, validation, solve, answer), assignment mode.

Repetitions alternate placement and bare LSA on the same matrix; the ratio is the median
of the per-repetition ratios (the machine is shared and its speed drifts). Target: the
1,000 x 1,000 placement in <= 0.5 s median.

    python benchmarks/placement.py            # 10, 100, 1,000; 7 repetitions (~1 min)
    python benchmarks/placement.py --quick    # 3 repetitions, split and route up to 100

Writes ``out/benchmarks/placement.json`` (see ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from processors.placement import solve_placement
from streams.api import placement as route
from streams.api.app import create_app
from streams.api.config import ApiSettings
from streams.api.state import ForecastState

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "benchmarks" / "placement.json"
TARGET_S = 0.5  # 1,000 x 1,000 placement, median seconds
SIZES = (10, 100, 1000)


def _timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def measure_assignment(n: int, reps: int, seed: int) -> dict[str, Any]:
    """Placement vs bare linear_sum_assignment, alternating, on the same matrices."""
    rng = np.random.default_rng(seed)
    place, bare, slots, ratios = [], [], [], []
    for _ in range(reps):
        cost = rng.random((n, n))
        tb, (rows, cols) = _timed(lambda c=cost: linear_sum_assignment(c))
        tp, p = _timed(lambda c=cost: solve_placement(np.ones(n), np.ones(n), c))
        ts, _ = _timed(lambda c=cost: solve_placement(np.ones(n), np.full(n, 2.0), c))
        assert abs(p.total_cost - cost[rows, cols].sum()) <= 1e-9 * n, "not the optimum"
        place.append(tp)
        bare.append(tb)
        slots.append(ts)
        ratios.append(tp / tb if tb > 0 else float("nan"))
    return {"n": n, "reps": reps, "placement_median_s": statistics.median(place),
            "bare_lsa_median_s": statistics.median(bare),
            "slots2_median_s": statistics.median(slots),
            "ratio_median": statistics.median(ratios)}


def measure_split(n: int, reps: int, seed: int) -> dict[str, Any]:
    """Splittable demands: the transport mode."""
    rng = np.random.default_rng(seed)
    times = []
    for _ in range(reps):
        cost = rng.random((n, n))
        demand = rng.uniform(1, 10, n)
        capacity = rng.uniform(1, 10, n)
        capacity *= 1.2 * demand.sum() / capacity.sum()
        t, _ = _timed(lambda d=demand, c=capacity, m=cost: solve_placement(d, c, m, split=True))
        times.append(t)
    return {"n": n, "reps": reps, "split_median_s": statistics.median(times)}


async def _route(n: int, reps: int, seed: int) -> list[float]:
    from aiohttp.test_utils import TestClient, TestServer

    app = create_app(ForecastState(), ApiSettings(max_body_bytes=64 << 20))
    route.add_routes(app)
    rng = np.random.default_rng(seed)
    times = []
    async with TestClient(TestServer(app)) as client:
        for _ in range(reps):
            body = {"sources": [{"demand": 1}] * n, "targets": [{"capacity": 1}] * n,
                    "cost": np.round(rng.random((n, n)) * 100, 1).tolist()}
            raw = json.dumps(body)
            t = time.perf_counter()
            r = await client.post(route.PATH, data=raw,
                                  headers={"Content-Type": "application/json"})
            out = await r.json()
            times.append(time.perf_counter() - t)
            assert r.status == 200 and out["method"] == "assignment", out
    return times


def measure_route(n: int, reps: int, seed: int) -> dict[str, Any]:
    """The HTTP route in-process, assignment mode."""
    return {"route_median_s": statistics.median(asyncio.run(_route(n, reps, seed)))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 repetitions, split and route up to 100")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    reps = 3 if args.quick else args.reps
    started = time.perf_counter()
    solve_placement(np.ones(2), np.ones(2), np.zeros((2, 2)), split=True)  # import POT
    rows = {n: measure_assignment(n, reps, seed=n) for n in SIZES}
    for n in SIZES:
        if n <= 100 or not args.quick:
            rows[n].update(measure_split(n, 3 if n >= 1000 else reps, seed=n + 1))
            rows[n].update(measure_route(n, 3 if n >= 1000 else reps, seed=n + 2))
    big = rows[1000]
    out: dict[str, Any] = {
        "benchmark": "placement", "quick": args.quick, "rows": list(rows.values()),
        "target_s": TARGET_S,
        "checks": {"placement_1000_median_ok": big["placement_median_s"] <= TARGET_S},
        "elapsed_seconds": round(time.perf_counter() - started, 1),
    }
    head = (f"{'N x M':>13} {'placement s':>12} {'bare LSA s':>11} {'ratio':>6} "
            f"{'slots x2 s':>11} {'split s':>9} {'route s':>9}")
    print(head)
    print("-" * len(head))
    for r in rows.values():
        split = f"{r['split_median_s']:9.4f}" if "split_median_s" in r else f"{'-':>9}"
        via = f"{r['route_median_s']:9.4f}" if "route_median_s" in r else f"{'-':>9}"
        print(f"{r['n']:>6} x {r['n']:<5} {r['placement_median_s']:12.4f} "
              f"{r['bare_lsa_median_s']:11.4f} {r['ratio_median']:6.2f} "
              f"{r['slots2_median_s']:11.4f} {split} {via}")
    print(f"medians of {reps} repetitions; target: placement 1,000 x 1,000 <= {TARGET_S} s")
    print(f"checks: {json.dumps(out['checks'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} in {out['elapsed_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
