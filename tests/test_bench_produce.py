"""Keeps benchmarks/produce.py working (its figures are quoted, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_produce_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "produce.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "produce.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"raw", "single", "batch"}
    for m in result["modes"].values():
        assert m["windows_per_s"] > 0 and m["windows_per_cpu_s"] > 0
    assert result["modes"]["raw"]["ratio_vs_raw"] == 1.0
    assert "windows/s" in done.stdout
