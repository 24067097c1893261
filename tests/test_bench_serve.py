"""The serving benchmark's --quick mode runs end to end and writes its JSON (the speed
targets themselves are read from a full run, not asserted here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve.py"), "--quick", "--endpoints",
         "2000", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    ip = res["in_process"]
    assert ip["single_1000_s"] > ip["batch_1000_s"] > 0
    assert ip["batch_vs_single"] > 1 and ip["batch_10000_ms"] > 0
    assert set(res["targets"]) == {"batch_vs_single>=20", "batch_10000_ms<=100"}
    if shutil.which("wrk") is not None:
        for route in ("predict", "health"):
            w = res["wrk"][route]
            assert w["rps"] > 0 and w["non2xx"] == 0 and w["rps_per_core"] > 0, (route, w)
    assert "single / batch" in r.stdout and "batch of 10,000" in r.stdout
