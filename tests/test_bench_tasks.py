"""The task benchmark's --quick mode runs end to end and writes its JSON (the speed
targets are read from a full run, not asserted here; the failover bound is)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tasks_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "tasks.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "tasks.py"), "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    tp = res["throughput"]["median"]
    assert tp["tasks"]["accepted_per_s"] > 0 and tp["tasks"]["errors"] == 0
    assert tp["baseline"]["per_core"] > tp["tasks"]["per_core"] > 0
    lat = res["latency"]
    assert lat["completed"] == lat["tasks"] > 0 and 0 < lat["p50_ms"] <= lat["p99_ms"]
    fo = res["failover"]
    assert fo["held"] >= 1 and fo["all_succeeded"] and fo["recorded_twice"] == 0
    assert min(fo["attempts"]) >= 2
    assert fo["retried_in_leases"] <= 2.5  # target 2; a little room for a loaded machine
    assert "tasks/s per API core" in r.stdout
    kept = res["throughput"]["kept"]
    assert kept["with_status"] >= kept["accepted"] > 0  # nothing accepted was lost
