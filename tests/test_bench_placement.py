"""benchmarks/placement.py --quick runs and writes a sane table: placement against bare
linear_sum_assignment on the same matrices, 10 to 1,000 square."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_placement_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "placement.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "placement.py"), "--quick", "--out",
         str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "bare LSA s" in proc.stdout and "wrote" in proc.stdout
    res = json.loads(out.read_text())
    rows = {r["n"]: r for r in res["rows"]}
    assert set(rows) == {10, 100, 1000}
    for r in rows.values():
        assert r["placement_median_s"] > 0 and r["bare_lsa_median_s"] > 0
        assert r["ratio_median"] > 0
    for key in ("split_median_s", "route_median_s"):  # quick: up to 100 only
        assert key in rows[100] and key not in rows[1000]
    assert res["checks"]["placement_1000_median_ok"] == (
        rows[1000]["placement_median_s"] <= res["target_s"])
