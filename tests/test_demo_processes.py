"""The demo's children: a part allowed to restart is started again when it dies (as a
service manager would), and said so; any other death stops the demo, naming the log."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from loadcast.demo.processes import Children, DemoError

CRASHER = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"


def _wait_dead(children: Children, name: str, timeout: float = 20.0) -> None:
    c = next(c for c in children.all if c.name == name)
    deadline = time.monotonic() + timeout
    while c.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.proc.poll() is not None, f"{name} did not exit"


def test_a_restartable_part_is_started_again_then_the_demo_stops(tmp_path: Path) -> None:
    (tmp_path / "crasher.py").write_text(CRASHER)
    children = Children(tmp_path, dict(os.environ))
    try:
        children.start("crasher", [], module="crasher", restarts=1)
        _wait_dead(children, "crasher")
        children.check()  # died once: started again, and recorded
        assert [(r["part"], r["exit_code"]) for r in children.restarted] == [("crasher", -11)]
        assert "exited with -11; started again" in (tmp_path / "crasher.log").read_text()
        _wait_dead(children, "crasher")
        with pytest.raises(DemoError, match=r"crasher exited with -11: see .*crasher\.log"):
            children.check()  # no restart left
        assert len(children.restarted) == 1
    finally:
        children.stop_all()


def test_a_part_without_restarts_stops_the_demo(tmp_path: Path) -> None:
    (tmp_path / "crasher.py").write_text(CRASHER)
    children = Children(tmp_path, dict(os.environ))
    try:
        children.start("crasher", [], module="crasher")
        _wait_dead(children, "crasher")
        with pytest.raises(DemoError, match="crasher exited with -11"):
            children.check()
        assert children.restarted == []
    finally:
        children.stop_all()


def test_a_part_read_through_its_stdout_cannot_be_restartable(tmp_path: Path) -> None:
    children = Children(tmp_path, dict(os.environ))
    with pytest.raises(ValueError, match="cannot be restarted"):
        children.start("bundles", [], module="crasher", stdout_pipe=True, restarts=1)
    assert children.all == []  # nothing was started
