"""The proxy benchmark's --quick mode runs end to end and writes its JSON (the speed
targets themselves are read from a full run, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from streams.sidecar.haproxy import haproxy_binary

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(haproxy_binary() is None,
                    reason="haproxy binary not installed (make system-deps installs it)")
def test_proxy_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "proxy.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "proxy.py"), "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["throughput"]) == {"direct", "haproxy", "haproxy+sidecar", "proxy"}
    for plane, v in res["throughput"].items():
        assert v["rps"] > 0 and v["errors"] == 0, (plane, v)
    for plane in ("haproxy+sidecar", "proxy"):
        lat = res["score_to_live"][plane]
        assert lat["n"] == 5 and 0 < lat["p50_ms"] < 5000
    assert {"proxy_vs_haproxy_rps", "sidecar_haproxy_vs_haproxy_rps"} <= set(res["ratios"])
    assert "proxy / haproxy" in r.stdout
    # the saturated-backends case (issue 14): the three data planes side by side
    sat = res["saturation"]
    assert set(sat["planes"]) == {"haproxy", "haproxy+sidecar", "proxy"}
    assert sat["connections"] == 50
    for plane, v in sat["planes"].items():
        assert v["ok_rps"] > 0 and "non2xx" in v, (plane, v)
    assert "haproxy+sidecar" in sat["ok_rps_vs_haproxy"]
    assert "2xx/s" in r.stdout and "saturated" in r.stdout
    # the same-CPU comparison: HAProxy with one thread, the proxy plain and with the edge
    # features on, each with its CPU time measured
    cores = res["cores"]
    assert set(cores["planes"]) == {"haproxy", "proxy", "proxy+edge"}
    assert cores["haproxy_threads"] == 1 and cores["slices"] >= 3
    for plane, v in cores["planes"].items():
        assert v["rps"] > 0 and v["per_cpu_s"] > 0 and v["errors"] == 0, (plane, v)
    assert "proxy+edge / haproxy(1 thread)" in r.stdout
