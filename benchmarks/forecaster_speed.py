"""Speed and size of one endpoint's forecaster.

For each kind: build a model with 60-s steps and a daily season, feed it one full season
(1440 steps) of a realistic series (the NYC taxi trace resampled to the step, scaled to
requests/s; a seeded synthetic daily pattern if the file is missing), then time
``learn`` + ``forecast(15)`` per step for ``--steps`` more steps and report the median (and
p90) in microseconds.  Size is ``len(pickle.dumps(model))`` (what a snapshot costs) and
the tracemalloc-measured memory the model holds after that season.

Usage::

    python benchmarks/forecaster_speed.py            # all kinds, 3000 timed steps
    python benchmarks/forecaster_speed.py --quick    # default only, 300 timed steps

``default`` runs with the global trees (:mod:`processors.forecasting.global_trees`): it
learns two seasons (first-season rows are not pooled), the trees are fitted on its rows
and set, then the timed steps include the trees' walk and, as in ``loadcast worker``,
handing the learning rows to a worker's pool thinned for ``--endpoints`` endpoints
(``SharedTrees``).  The refit is timed apart on a full
pool (the rows tiled to ``max_rows``) and amortized over the steps between two refits
(``refit_seconds / step``) and the endpoints of one worker (``--endpoints``, default 100,
the stated assumption): ``amortized_us`` = median + refit share.  The trees and the
trainer's pool are held once per worker, not per endpoint: reported apart.

Writes ``out/benchmarks/forecaster_speed.json`` (see ``--out``) and prints a table.
Targets for ``default``: median <= 400 µs, <= 250 KB per endpoint model.  The median is
reported as wall time (``median_us``) and as the thread's CPU time (``cpu_median_us``):
on a shared, overloaded machine preemption inflates the wall time, not the CPU time.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import pickle
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "out" / "benchmarks"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from processors.forecasting import KINDS, make_forecaster  # noqa: E402
from processors.forecasting.direct import DirectForecaster  # noqa: E402
from processors.forecasting.global_trees import GlobalTreeTrainer, SharedTrees  # noqa: E402
from processors.forecasting.kernels import warm_up  # noqa: E402
from streams.edge.replay import data_dir  # noqa: E402

DATA = data_dir() / "nyc_taxi.csv"
STEP, SEASON, HORIZON = 60, 86400, 15
TARGET_US, TARGET_BYTES = 400.0, 250_000


def series(n: int) -> np.ndarray:
    """``n`` one-minute rates: the taxi trace linearly interpolated from 30 min to 1 min."""
    if DATA.exists():
        with open(DATA, newline="") as fh:
            raw = np.array([float(r["value"]) for r in csv.DictReader(fh)])
        fine = np.interp(np.arange(len(raw) * 30) / 30.0, np.arange(len(raw)), raw) / 60.0
        reps = int(np.ceil(n / len(fine)))
        return np.tile(fine, reps)[:n]
    rng = np.random.default_rng(0)
    t = np.arange(n)
    return np.clip(100 + 60 * np.sin(2 * np.pi * t / 1440) + rng.normal(0, 8, n), 0, None)


def measure(kind: str, timed_steps: int, endpoints: int = 100) -> dict[str, Any]:
    warm = SEASON // STEP
    f = make_forecaster(kind, step_seconds=STEP, season_seconds=SEASON, max_horizon=HORIZON)
    trainer = None
    if kind == "default" and isinstance(f, DirectForecaster):
        warm *= 2  # first-season rows are not pooled for the trees
        trainer = GlobalTreeTrainer.for_forecaster(f)
    y = series(warm + timed_steps)
    warm_up()  # compile or load the kernels now: not counted as the model's memory
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    f = make_forecaster(kind, step_seconds=STEP, season_seconds=SEASON, max_horizon=HORIZON)
    if trainer is not None and isinstance(f, DirectForecaster):
        f.observe_rows(trainer)
    for i in range(warm):
        f.learn(i * STEP, float(y[i]))
        f.forecast(HORIZON)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    glob: dict[str, Any] = {}
    plain = None  # the same model without the trees, timed step by step alongside
    if trainer is not None and isinstance(f, DirectForecaster):
        f.observe_rows(None)
        plain = pickle.loads(pickle.dumps(f))  # the trees are not pickled
        glob = _global_cost(f, trainer, endpoints)  # sets the trees on f
        # Rows go to a worker's pool, thinned as for ``endpoints`` endpoints (the worker).
        pool = SharedTrees()
        pool.attach(f, f.global_model)
        pool.thin(endpoints)
        glob["pool_keep_every"] = pool.trainer.keep_every if pool.trainer else None
    snapshot = len(pickle.dumps(f))
    times = np.empty(timed_steps)
    cpu = np.empty(timed_steps)
    times_plain = np.empty(timed_steps)
    for k in range(timed_steps):
        i = warm + k
        c0 = time.thread_time_ns()
        t0 = time.perf_counter()
        f.learn(i * STEP, float(y[i]))
        f.forecast(HORIZON)
        times[k] = time.perf_counter() - t0
        cpu[k] = (time.thread_time_ns() - c0) * 1e-9
        if plain is not None:
            t0 = time.perf_counter()
            plain.learn(i * STEP, float(y[i]))
            plain.forecast(HORIZON)
            times_plain[k] = time.perf_counter() - t0
    if glob:
        glob["amortized_us"] = round(float(np.median(times)) * 1e6 + glob["refit_share_us"], 1)
        glob["median_us_without_trees"] = round(float(np.median(times_plain)) * 1e6, 1)
    return {
        **glob,
        "median_us": round(float(np.median(times)) * 1e6, 1),
        "cpu_median_us": round(float(np.median(cpu)) * 1e6, 1),
        "p90_us": round(float(np.percentile(times, 90)) * 1e6, 1),
        "timed_steps": timed_steps,
        "pickle_bytes": snapshot,
        "pickle_bytes_after_timing": len(pickle.dumps(f)),
        "tracemalloc_bytes": int(held),
    }


def _global_cost(f: DirectForecaster, trainer: GlobalTreeTrainer,
                 endpoints: int) -> dict[str, Any]:
    """Fit the global trees on ``f``'s pooled rows and set them; time a refit on a full
    pool (the rows tiled to ``max_rows``) and its share per endpoint step."""
    model = trainer.refit(f.last_ts or 0.0)
    f.set_global_model(model)
    held = trainer.rows_held
    full = GlobalTreeTrainer.for_forecaster(f)
    reps = -(-full.max_rows // held)
    full._X[:] = np.tile(trainer._X[:held], (reps, 1))[: full.max_rows]
    full._y[:] = np.tile(trainer._y[:held], reps)[: full.max_rows]
    full._n = full.max_rows
    took = []
    for _ in range(3):
        t0 = time.perf_counter()
        full.refit(0.0)
        took.append(time.perf_counter() - t0)
    refit_s = float(np.median(took))
    steps_between = full.refit_seconds / STEP
    return {
        "global_model_bytes": model.nbytes if model else 0,
        "global_pool_bytes": full._X.nbytes + full._y.nbytes,
        "global_pool_rows": full.max_rows,
        "refit_seconds": round(refit_s, 2),
        "refit_every_steps": steps_between,
        "endpoints_per_worker": endpoints,
        "refit_share_us": round(refit_s * 1e6 / (steps_between * endpoints), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default=None, help="comma-separated kinds (default: all)")
    ap.add_argument("--steps", type=int, default=3000, help="timed steps after the season")
    ap.add_argument("--quick", action="store_true", help="default kind, 300 timed steps")
    ap.add_argument("--endpoints", type=int, default=100,
                    help="endpoints per worker the global trees' refit is amortized over")
    ap.add_argument("--out", type=Path, default=OUT_DIR / "forecaster_speed.json")
    args = ap.parse_args(argv)
    kinds = ["default"] if args.quick else list(KINDS)
    if args.kinds:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    steps = 300 if args.quick else args.steps
    started = time.perf_counter()
    results = {kind: measure(kind, steps, args.endpoints) for kind in kinds}
    out: dict[str, Any] = {
        "benchmark": "forecaster_speed",
        "quick": args.quick,
        "step_seconds": STEP,
        "season_seconds": SEASON,
        "horizon": HORIZON,
        "kinds": results,
        "targets": {"median_us": TARGET_US, "bytes": TARGET_BYTES},
    }
    if "default" in results:
        d = results["default"]
        out["checks"] = {
            "default_median_us_ok": d["median_us"] <= TARGET_US,
            "default_amortized_us_ok": d.get("amortized_us", d["median_us"]) <= TARGET_US,
            "default_cpu_median_us_ok": d["cpu_median_us"] <= TARGET_US,
            "default_bytes_ok": max(d["pickle_bytes_after_timing"], d["tracemalloc_bytes"])
            <= TARGET_BYTES,
        }
    out["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    head = (f"{'kind':15} {'median µs':>10} {'p90 µs':>9} {'CPU med µs':>11} {'pickle KB':>10}"
            f" {'traced KB':>10}")
    print(head)
    print("-" * len(head))
    for kind, r in results.items():
        print(
            f"{kind:15} {r['median_us']:10.1f} {r['p90_us']:9.1f} {r['cpu_median_us']:11.1f} "
            f"{r['pickle_bytes_after_timing'] / 1000:10.1f} {r['tracemalloc_bytes'] / 1000:10.1f}"
        )
        if "refit_seconds" in r:
            print(f"{'':15} global trees: {r['global_model_bytes'] / 1000:.0f} KB and a pool of "
                  f"{r['global_pool_rows']:,} rows ({r['global_pool_bytes'] / 1e6:.1f} MB) per "
                  f"worker; refit {r['refit_seconds']} s every {r['refit_every_steps']:.0f} "
                  f"steps over {r['endpoints_per_worker']} endpoints = "
                  f"{r['refit_share_us']} µs per endpoint step; amortized median "
                  f"{r['amortized_us']} µs; the same model without the trees, timed "
                  f"alongside: {r['median_us_without_trees']} µs")
    if "checks" in out:
        print(f"checks: {json.dumps(out['checks'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} in {out['elapsed_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
