"""Keeps benchmarks/faults.py working: its --quick run must meet the Done-when checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_faults_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "faults.py"), "--quick", "--out", str(out),
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=400,
    )
    result = json.loads(out.read_text()) if out.exists() else {}
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert result["failures"] == []
    assert result["malformed_telemetry"] > 4_000
    assert result["malformed_dead_lettered_by_worker"] == result["malformed_telemetry"]
    assert result["malformed_dead_lettered_by_sink"] == result["malformed_telemetry"]
    assert result["valid_stored"] == result["valid_telemetry"]
    assert result["stored_but_rejected_by_worker"] == 0
    assert "malformed records" in done.stdout
