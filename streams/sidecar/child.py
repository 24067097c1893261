"""A data plane that runs as a child process (HAProxy, Envoy): checked and stopped alike.

>>> import sys
>>> c = ChildProcess(Path("/nonexistent.log"))
>>> c.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
>>> c.alive(), c.log_tail()
(True, '')
>>> c.terminate(); c.alive()
False
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


class ChildProcess:
    """``proc`` (set by the subclass's ``start``) with its log file at ``log_path``."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 1500) -> str:
        """The last ``n`` characters of its log ('' if there is none yet)."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def check_alive(self, name: str, error: type[Exception]) -> None:
        """Raise ``error`` with the log tail if the process was started and has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise error(f"{name} exited: {self.log_tail()}")

    def terminate(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; waits for it to end."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(grace_s)
        self.proc = None
