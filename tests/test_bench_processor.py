"""Keeps benchmarks/processor.py working (figures are quoted in notes, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_processor_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "processor.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "processor.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=420,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    r = json.loads(out.read_text())
    for kind in ("batch", "single", "noop"):
        assert r["phases"][kind]["windows_per_s"] > 0
    assert r["phases"]["batch"]["scores_published"] > 0
    for key in ("latency", "latency_broker", "latency_batch", "latency_batch_broker"):
        lat = r["phases"][key]
        assert lat["probes"] > 0 and lat["lost"] == 0 and lat["p99_ms"] > 0, key
    assert r["phases"]["latency"]["worker_cpu"] > 0
    assert r["single_vs_noop"] > 0
