"""Federated learning of the default forecaster vs central training, on real traces.

Protocol, per trace of ``streams/traces`` (or ``$LOADCAST_DATA_DIR``) (``timestamp,value``):

* The last 20 % of the series is the **test** section; the first 80 % is split across 4
  simulated edges, either in 4 contiguous **time** blocks or in day-long blocks
  **shuffled** (seeded) and dealt round-robin.  Each edge sees only its own blocks, as
  telemetry windows through the real :class:`~streams.edge.federated.LocalTrainer`.
* **central**: one forecaster trained on the whole training section in time order.
  **edge alone**: each edge's own weights, never averaged (mean and worst of the 4).
  **fedavg**: R synchronous rounds through :class:`~processors.federated.rounds.RoundCoordinator`
  with the default ``"fedavg"`` aggregation (each edge trains on the next 1/R of its data,
  sends its update; all 4 close the round; edges load the new version).  The edges'
  updates are least-squares row statistics, so this is federated least squares (see
  :mod:`processors.federated`).  **poisoned**: the same, but edge 3 sends its delta (the
  statistics) times -1000 every round: plain sums without any defence ("noclip"), the
  default adaptive centred clipping (3 x the round's median deviation, counts capped),
  coordinate-wise median and trimmed mean as robust centres.
* **Test MAE** of a weight matrix: a forecaster loaded with it, learning frozen (RLS
  covariance zero), ``select="model"``, fed the history before the test section and then
  the test section; mean absolute error over every horizon 1..15 of every test target.
  Learning is frozen so the number measures the weights, not how fast RLS re-adapts.
* **Cold start**: a new endpoint whose data begins at the start of the test section (and
  at the next 4 day boundaries, averaged); MASE of its forecasts over its first day (all
  horizons 1..15), from scratch vs warm-started from the FedAvg global model (time split).
  The MASE scale is the in-sample seasonal-naive MAE of the test section.  Days 2-3 are
  reported too, and as a reference for what is reachable on those days, the first-day MASE
  of the central model that has the endpoint's whole history (trained on the training
  section, learning on through the test section up to the start).

Usage::

    python benchmarks/federated.py            # both traces, both splits
    python benchmarks/federated.py --quick    # the ELB trace, time split, a few seconds

Writes ``out/benchmarks/federated.json`` and prints a table of ratios to central.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "out" / "benchmarks"
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.forecast_accuracy import load_series  # noqa: E402
from processors.federated.aggregation import AggregationConfig  # noqa: E402
from processors.federated.coldstart import warm_start  # noqa: E402
from processors.federated.params import load_weights, shared_view  # noqa: E402
from processors.federated.rounds import RoundCoordinator  # noqa: E402
from processors.forecasting.direct import DirectForecaster  # noqa: E402
from schemas.federated import GlobalState, ModelDelta  # noqa: E402
from streams.edge.federated import EdgeTrainingConfig, LocalTrainer  # noqa: E402
from streams.edge.replay import data_dir  # noqa: E402

DATA_DIR = data_dir()
DEFAULT_FILES = ("elb_request_count_8c0756.csv", "nyc_taxi.csv")
H = 15
EDGES = 4
POISONED_EDGE = 3
POISON_SCALE = -1000.0
TARGETS = {"fedavg_vs_central_max": 1.05, "cold_start_improvement_min": 0.30,
           "poisoned_vs_clean_max": 1.10}


def _windows(eid: str, ts: np.ndarray, y: np.ndarray, step: int) -> list[dict[str, Any]]:
    return [{"endpoint_id": eid, "window_start": round(t * 1000),
             "window_end": round((t + step) * 1000), "request_count": float(v)}
            for t, v in zip(ts, y, strict=True)]


def split(n: int, mode: str, m: int, seed: int = 7) -> list[np.ndarray]:
    """Indices of the training section per edge: 4 time blocks, or shuffled day blocks."""
    idx = np.arange(n)
    if mode == "time":
        return [np.asarray(b) for b in np.array_split(idx, EDGES)]
    blocks = [idx[i: i + m] for i in range(0, n, m)]
    order = np.random.default_rng(seed).permutation(len(blocks))
    return [np.sort(np.concatenate([blocks[j] for j in order[k::EDGES]]))
            for k in range(EDGES)]


def frozen_mae(weights: np.ndarray, ts: np.ndarray, y: np.ndarray, test_start: int,
               step: int) -> float:
    """MAE (all horizons) over the test section with ``weights`` frozen."""
    f = DirectForecaster(step, max_horizon=H, select="model")
    load_weights(f, weights)
    f.set_prior(covariance=0.0)  # RLS gain 0: the weights stay as given
    start = max(0, test_start - f._L)
    n = len(y)
    err_sum, cnt = 0.0, 0
    pending: dict[int, list[float]] = {}
    for i in range(start, n):
        if i in pending:
            for pm in pending.pop(i):
                err_sum += abs(y[i] - pm)
                cnt += 1
        f.learn(float(ts[i]), float(y[i]))
        for p in f.forecast(H):
            j = i + p.horizon
            if test_start <= j < n:
                pending.setdefault(j, []).append(p.mean)
    return err_sum / max(cnt, 1)


def cold_mase(f: Any, ts: np.ndarray, y: np.ndarray, m: int, scale: float,
              days: int = 3) -> list[float]:
    """MASE per day (all horizons) of a new endpoint fed ``y`` from its first value."""
    n = min(len(y), days * m)
    errs: list[list[float]] = [[] for _ in range(days)]
    pending: dict[int, list[float]] = {}
    for i in range(n):
        for pm in pending.pop(i, []):
            errs[i // m].append(abs(y[i] - pm))
        f.learn(float(ts[i]), float(y[i]))
        for p in f.forecast(H):
            if i + p.horizon < n:
                pending.setdefault(i + p.horizon, []).append(p.mean)
    return [float(np.mean(e)) / scale if e else math.nan for e in errs]


def _poison(u: ModelDelta) -> ModelDelta:
    u.delta = {k: v * POISON_SCALE for k, v in u.delta.items()}
    return u


def federate(parts: list[tuple[np.ndarray, np.ndarray]], cfg: EdgeTrainingConfig,
             rounds: int, agg: AggregationConfig | None, poison: bool = False,
             attack: Callable[[ModelDelta], ModelDelta] = _poison,
             ) -> tuple[GlobalState | None, list[np.ndarray]]:
    """Run ``rounds`` rounds over the edges' data; agg None = edges alone (no rounds).
    With ``poison`` edge 3 sends ``attack(update)`` (default: its delta x -1000)."""
    trainers = [LocalTrainer(f"edge-{k}", cfg) for k in range(EDGES)]
    coord = RoundCoordinator(agg or AggregationConfig(), min_updates=EDGES, round_timeout=1e9)
    state = None
    for r in range(rounds):
        for k, tr in enumerate(trainers):
            ts, y = parts[k]
            sl = np.array_split(np.arange(len(y)), rounds)[r]
            tr.observe(_windows(f"ep-{k}", ts[sl], y[sl], cfg.step_seconds))
        if agg is None:
            continue
        for k, tr in enumerate(trainers):
            u = tr.make_update(now=float(r))
            if u is None:
                continue
            if poison and k == POISONED_EDGE:
                u = attack(u)
            for s in coord.offer(u, now=float(r)):
                state = s
        if state is not None:
            for tr in trainers:
                tr.load_global(state)
    local = [shared_view(tr.forecaster(tr.endpoints[0]))[0] for tr in trainers]
    return state, local


def bench_file(path: Path, modes: list[str], rounds: int, quick: bool) -> dict[str, Any]:
    ts, y = load_series(path)
    step = int(np.median(np.diff(ts)))
    m = round(86400 / step)
    n = len(y)
    test_start = int(n * 0.8)
    cfg = EdgeTrainingConfig(step_seconds=step, horizon=H)
    t0 = time.perf_counter()
    central = DirectForecaster(step, max_horizon=H)
    for i in range(test_start):
        central.learn(float(ts[i]), float(y[i]))
    mae_central = frozen_mae(shared_view(central)[0], ts, y, test_start, step)
    out: dict[str, Any] = {"rows": n, "step_seconds": step, "test_rows": n - test_start,
                           "central_mae": round(mae_central, 4), "splits": {}}
    fed_time_state: GlobalState | None = None
    for mode in modes:
        idx = split(test_start, mode, m)
        parts = [(ts[ix], y[ix]) for ix in idx]
        res: dict[str, Any] = {}
        _, alone = federate(parts, cfg, rounds, None)
        alone_mae = [frozen_mae(w, ts, y, test_start, step) for w in alone]
        res["edge_alone_mean"] = float(np.mean(alone_mae))
        res["edge_alone_worst"] = float(np.max(alone_mae))
        state, _ = federate(parts, cfg, rounds, AggregationConfig())
        assert state is not None
        if mode == "time":
            fed_time_state = state
        res["fedavg"] = frozen_mae(state.params["weights"], ts, y, test_start, step)
        variants = {"poisoned_fedavg_noclip": AggregationConfig(clip_median_multiple=None),
                    "poisoned_fedavg_clip": AggregationConfig(),
                    "poisoned_median": AggregationConfig(method="median"),
                    "poisoned_trimmed_mean": AggregationConfig(method="trimmed-mean")}
        if quick:
            variants = {k: v for k, v in variants.items() if k != "poisoned_trimmed_mean"}
        for name, agg in variants.items():
            ps, _ = federate(parts, cfg, rounds, agg, poison=True)
            assert ps is not None
            w = ps.params["weights"]
            res[name] = (frozen_mae(w, ts, y, test_start, step) if np.all(np.isfinite(w))
                         else math.inf)
        out["splits"][mode] = {
            "mae": {k: round(v, 4) for k, v in res.items()},
            "vs_central": {k: round(v / mae_central, 4) for k, v in res.items()},
            "poisoned_vs_clean": {k: round(v / res["fedavg"], 4) for k, v in res.items()
                                  if k.startswith("poisoned")},
        }
    # Cold start: new endpoints from the test section, scratch vs warm (time-split global).
    assert fed_time_state is not None
    scale = float(np.mean(np.abs(y[test_start + m:] - y[test_start:-m])))
    starts = [test_start + k * m for k in range(5) if test_start + k * m + 3 * m <= n]
    if not starts:
        starts = [test_start]
    scratch, warm, history = [], [], []
    for s in starts:
        ref = pickle.loads(pickle.dumps(central))
        for i in range(test_start, s):
            ref.learn(float(ts[i]), float(y[i]))
        history.append(cold_mase(ref, ts[s:], y[s:], m, scale, days=1)[0])
        scratch.append(cold_mase(DirectForecaster(step, max_horizon=H), ts[s:], y[s:], m,
                                 scale))
        f = warm_start(DirectForecaster(step, max_horizon=H), fed_time_state)
        warm.append(cold_mase(f, ts[s:], y[s:], m, scale))
    sc, wa = np.nanmean(scratch, axis=0), np.nanmean(warm, axis=0)
    out["cold_start"] = {
        "starts": len(starts),
        "scratch_mase_by_day": [round(float(v), 4) for v in sc],
        "warm_mase_by_day": [round(float(v), 4) for v in wa],
        "first_day_improvement": round(float(1 - wa[0] / sc[0]), 4),
        "with_history_mase_day1": round(float(np.mean(history)), 4),
        "with_history_first_day_improvement": round(float(1 - np.mean(history) / sc[0]), 4),
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def checks(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, entry in result["files"].items():
        c: dict[str, Any] = {}
        for mode, s in entry["splits"].items():
            c[f"{mode}.fedavg_within_5pct_of_central"] = bool(
                s["vs_central"]["fedavg"] <= TARGETS["fedavg_vs_central_max"])
            robust = {k: v for k, v in s["poisoned_vs_clean"].items() if "noclip" not in k}
            c[f"{mode}.poisoned_robust_within_10pct"] = {
                k: bool(v <= TARGETS["poisoned_vs_clean_max"]) for k, v in robust.items()}
        c["cold_start_30pct_better"] = bool(entry["cold_start"]["first_day_improvement"]
                                        >= TARGETS["cold_start_improvement_min"])
        out[name] = c
    return out


def print_table(result: dict[str, Any]) -> None:
    for name, e in result["files"].items():
        print(f"\n{name}  (step {e['step_seconds']}s, test rows {e['test_rows']}, "
              f"central test MAE {e['central_mae']:.3f}, {e['seconds']}s)")
        modes = list(e["splits"])
        rows = list(e["splits"][modes[0]]["mae"])
        print(f"  {'test MAE / central':<26}" + "".join(f"{m:>16}" for m in modes))
        for r in rows:
            print(f"  {r:<26}" + "".join(
                f"{e['splits'][m]['vs_central'].get(r, math.nan):>16.3f}" for m in modes))
        cs = e["cold_start"]
        print(f"  cold start MASE by day ({cs['starts']} new endpoints): scratch "
              f"{cs['scratch_mase_by_day']}  warm {cs['warm_mase_by_day']}  first-day "
              f"improvement {cs['first_day_improvement']:.1%}")
        print(f"  reference: the central model with the whole history, first day MASE "
              f"{cs['with_history_mase_day1']}  (improvement over scratch "
              f"{cs['with_history_first_day_improvement']:.1%})")
    print("\nchecks:", json.dumps(result["checks"], indent=1))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", type=Path, help="CSV file (repeatable)")
    ap.add_argument("--quick", action="store_true", help="ELB only, time split, 3 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", type=Path, default=OUT_DIR / "federated.json")
    args = ap.parse_args(argv)
    files = args.data or [DATA_DIR / DEFAULT_FILES[0]] if args.quick else (
        args.data or [DATA_DIR / f for f in DEFAULT_FILES])
    modes = ["time"] if args.quick else ["time", "shuffled"]
    rounds = args.rounds or (3 if args.quick else 6)
    result: dict[str, Any] = {"benchmark": "federated", "quick": args.quick, "rounds": rounds,
                              "edges": EDGES, "targets": TARGETS, "files": {}}
    for path in files:
        result["files"][path.name] = bench_file(path, modes, rounds, args.quick)
    result["checks"] = checks(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print_table(result)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
