"""The forecasting benchmarks run end to end (--quick) and write sane JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streams.edge.replay import data_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = data_dir()


def _run(script: str, out: Path, *extra: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_forecast_accuracy_quick(tmp_path: Path) -> None:
    res = _run(
        "forecast_accuracy.py", tmp_path / "acc.json",
        "--data", str(DATA / "nyc_taxi.csv"), "--kinds", "default,seasonal_naive,persistence",
    )
    entry = res["files"]["nyc_taxi.csv"]
    assert entry["step_seconds"] == 1800 and entry["season_steps"] == 48
    kinds = entry["kinds"]
    assert set(kinds) == {"default", "seasonal_naive", "persistence"}
    for r in kinds.values():
        assert set(r["mase"]) == {"1", "5", "15"}
        assert all(v > 0 for v in r["mase"].values())
        assert 0.0 <= r["coverage_all_horizons"] <= 1.0
    assert kinds["seasonal_naive"]["mase"]["1"] == pytest.approx(1.0, abs=0.05)
    for h in ("1", "5", "15"):
        assert kinds["default"]["mase"][h] < kinds["seasonal_naive"]["mase"][h]
    assert res["checks"]["nyc_taxi.csv"]["default_le_seasonal_naive_all_h"]
    assert kinds["default"]["global_refits"] >= 1  # the global trees took part


def test_forecaster_speed_quick(tmp_path: Path) -> None:
    res = _run("forecaster_speed.py", tmp_path / "speed.json")
    d = res["kinds"]["default"]
    assert d["median_us"] > 0 and d["timed_steps"] == 300
    assert 0 < d["pickle_bytes"] <= 250_000
    assert d["cpu_median_us"] > 0
    assert set(res["checks"]) == {"default_median_us_ok", "default_cpu_median_us_ok",
                                  "default_amortized_us_ok", "default_bytes_ok"}
    # The global trees: walked in the timed steps, their refit amortized, sizes stated.
    assert d["amortized_us"] >= d["median_us"] > 0 and d["median_us_without_trees"] > 0
    assert d["refit_seconds"] > 0 and d["endpoints_per_worker"] == 100
    assert 0 < d["global_model_bytes"] < 1_000_000


def test_forecast_accuracy_anchor_rows_quick(tmp_path: Path) -> None:
    """The offline anchors are rows of the same table, scored on the same points."""
    pytest.importorskip("lightgbm")
    res = _run(
        "forecast_accuracy.py", tmp_path / "acc.json",
        "--data", str(DATA / "elb_request_count_8c0756.csv"),
        "--kinds", "default,lightgbm_ref,ridge_ref",
    )
    kinds = res["files"]["elb_request_count_8c0756.csv"]["kinds"]
    for ref in ("lightgbm_ref", "ridge_ref"):
        assert kinds[ref]["reference"] is True
        assert set(kinds[ref]["mase"]) == {"1", "5", "15"}
        assert all(0 < v < 2 for v in kinds[ref]["mase"].values())
    c = res["checks"]["elb_request_count_8c0756.csv"]
    assert set(c["default_vs_lightgbm_ref"]) == {"1", "5", "15"}
    assert isinstance(c["default_within_3pct_of_lightgbm_ref"], bool)


@pytest.mark.parametrize("anchor", ["lightgbm", "ridge"])
def test_anchor_forecasts_do_not_look_ahead(anchor: str) -> None:
    """Changing the series from some step on changes no anchor forecast made before it."""
    if anchor == "lightgbm":
        pytest.importorskip("lightgbm")
    from benchmarks.forecast_accuracy import lightgbm_forecasts, ridge_forecasts

    rng = np.random.default_rng(0)
    m, n, cut = 48, 48 * 5, 48 * 4 + 7
    ts = 1800.0 * np.arange(n)
    y = 100 + 50 * np.sin(2 * np.pi * np.arange(n) / m) + rng.normal(0, 5, n)
    y2 = y.copy()
    y2[cut:] *= 3.0
    run = lightgbm_forecasts if anchor == "lightgbm" else ridge_forecasts
    a, b = run(ts, y, 1800, horizons=(1, 5)), run(ts, y2, 1800, horizons=(1, 5))
    assert a is not None and b is not None
    for h in (1, 5):
        np.testing.assert_array_equal(a[h][:cut], b[h][:cut])
        assert not np.array_equal(a[h][cut:], b[h][cut:])
