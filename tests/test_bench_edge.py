"""The edge benchmark's --quick mode runs end to end and writes its JSON (the targets are
read from a full run; here: the three configurations ran on the same trace, the cache
answered most of it, and warming refreshed keys; its spike figure is too small and too
timing-sensitive in a few seconds on a shared machine to assert a direction)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_edge_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "edge.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "edge.py"), "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    c = res["configs"]
    assert set(c) == {"no-cache", "swr", "swr+warming"}
    assert len({v["requests"] for v in c.values()}) == 1  # the same replayed trace
    for v in c.values():
        assert v["errors"] == 0 and v["requests"] > 500
    assert c["no-cache"]["origin_requests"] == c["no-cache"]["requests"]
    assert c["swr"]["origin_requests"] < c["no-cache"]["origin_requests"] / 2
    assert c["swr"]["hit_ratio"] > 0.5 and c["swr+warming"]["warmed"] > 0
    hits = res["hits"]
    assert hits["haproxy_threads"] == 1 and len(hits["proxy"]) == len(hits["haproxy"]) == 2
    assert hits["proxy"][0]["rps"] > 0 and hits["proxy"][0]["per_cpu_s"] > 0
    # every request's bytes different: still hits, none failed
    new = hits["proxy (new bytes)"]
    assert len(new) == 2 and all(r["rps"] > 0 and r["errors"] == 0 for r in new)
    assert res["ratios"]["proxy_vs_haproxy_hit_per_cpu_s"] > 0
    assert "origin requests during the spike" in r.stdout
