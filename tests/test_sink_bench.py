"""Keeps benchmarks/sink.py working (its figures are quoted, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_sink_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "sink.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sink.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"raw", "sink", "sink_python_decode"}
    assert result["rows"] == 50_000
    for m in result["modes"].values():
        assert m["rows_per_s"] > 0
    assert result["modes"]["raw"]["ratio_vs_raw"] == 1.0
    assert "rows/s" in done.stdout
