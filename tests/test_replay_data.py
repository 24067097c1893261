"""The repository stands alone: the traces ship inside it and every default finds them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streams.edge.replay import ELB_TRACE, NYC_TRACE, TRACES, data_dir, read_trace, trace_path

REPO = Path(__file__).resolve().parents[1]


def test_traces_ship_with_their_licence() -> None:
    assert (TRACES / "NAB-LICENSE.txt").is_file()
    assert len(read_trace(TRACES / ELB_TRACE).rows) == 4032
    assert len(read_trace(TRACES / NYC_TRACE).rows) == 10320


def test_bare_names_resolve_in_the_data_dir(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.delenv("LOADCAST_DATA_DIR", raising=False)
    assert trace_path(ELB_TRACE) == TRACES / ELB_TRACE
    (tmp_path / "mine.csv").write_text("timestamp,value\n0,1\n60,2\n")
    monkeypatch.setenv("LOADCAST_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    assert read_trace("mine.csv").step_seconds == 60


def test_nothing_outside_the_clone_is_read() -> None:
    """No code, test, benchmark or deployment file points outside the clone."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    # Spelled in pieces so that this file does not find itself.
    needles = ("shared" + "/data", ".." + "/shared")
    offenders = []
    for name in tracked:
        if not name.endswith((".py", ".yml", ".yaml", ".toml", "Makefile", ".sh", "run")):
            continue
        text = (REPO / name).read_text(encoding="utf-8", errors="replace")
        if any(needle in text for needle in needles):
            offenders.append(name)
    assert offenders == [], f"files reading outside the clone: {offenders}"


def test_agent_help_names_the_default_trace_folder() -> None:
    r = subprocess.run([sys.executable, "-m", "loadcast", "agent", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=60,
                       env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "streams/traces" in r.stdout
