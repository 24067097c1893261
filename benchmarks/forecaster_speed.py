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


def measure(kind: str, timed_steps: int) -> dict[str, Any]:
    season_steps = SEASON // STEP
    y = series(season_steps + timed_steps)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    f = make_forecaster(kind, step_seconds=STEP, season_seconds=SEASON, max_horizon=HORIZON)
    for i in range(season_steps):
        f.learn(i * STEP, float(y[i]))
        f.forecast(HORIZON)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    snapshot = len(pickle.dumps(f))
    times = np.empty(timed_steps)
    cpu = np.empty(timed_steps)
    for k in range(timed_steps):
        i = season_steps + k
        c0 = time.thread_time_ns()
        t0 = time.perf_counter()
        f.learn(i * STEP, float(y[i]))
        f.forecast(HORIZON)
        times[k] = time.perf_counter() - t0
        cpu[k] = (time.thread_time_ns() - c0) * 1e-9
    return {
        "median_us": round(float(np.median(times)) * 1e6, 1),
        "cpu_median_us": round(float(np.median(cpu)) * 1e6, 1),
        "p90_us": round(float(np.percentile(times, 90)) * 1e6, 1),
        "timed_steps": timed_steps,
        "pickle_bytes": snapshot,
        "pickle_bytes_after_timing": len(pickle.dumps(f)),
        "tracemalloc_bytes": int(held),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default=None, help="comma-separated kinds (default: all)")
    ap.add_argument("--steps", type=int, default=3000, help="timed steps after the season")
    ap.add_argument("--quick", action="store_true", help="default kind, 300 timed steps")
    ap.add_argument("--out", type=Path, default=OUT_DIR / "forecaster_speed.json")
    args = ap.parse_args(argv)
    kinds = ["default"] if args.quick else list(KINDS)
    if args.kinds:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    steps = 300 if args.quick else args.steps
    started = time.perf_counter()
    results = {kind: measure(kind, steps) for kind in kinds}
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
    if "checks" in out:
        print(f"checks: {json.dumps(out['checks'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} in {out['elapsed_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
