"""The upstream-client benchmark's --quick mode runs end to end and writes its JSON (the
figures themselves are read from a full run, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_upstream_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "upstream.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "upstream.py"), "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["clients"]) == {"ClientSession", "UpstreamPool"}
    for name, v in res["clients"].items():
        assert v["cpu_us"] > 0 and v["rps"] > 0, (name, v)
    assert res["session_vs_pool_cpu"] > 0 and len(res["session_vs_pool_cpu_per_round"]) == 1
    assert "ClientSession / UpstreamPool" in r.stdout
