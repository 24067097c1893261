"""The federated benchmark's --quick mode runs and reports what the issue asks for."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.federated import main


def test_quick_benchmark_writes_ratios_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "federated.json"
    result = main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "federated"
    (entry,) = result["files"].values()
    ratios = entry["splits"]["time"]["vs_central"]
    assert {"edge_alone_mean", "fedavg", "poisoned_median"} <= set(ratios)
    # FedAvg on 4 disjoint edges close to central training on the same (ELB) data.
    assert ratios["fedavg"] <= 1.10, ratios
    # Without any defence the poisoned edge wrecks the model; the median contains it.
    assert ratios["poisoned_fedavg_noclip"] > 2 * ratios["fedavg"]
    assert entry["splits"]["time"]["poisoned_vs_clean"]["poisoned_median"] <= 1.10
    assert len(entry["cold_start"]["warm_mase_by_day"]) == 3
