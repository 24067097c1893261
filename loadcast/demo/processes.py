"""The demo's child processes and the waits on them: each part runs as a real process
(``python -m loadcast ...``) in a session of its own, with its log in the work directory;
at the end, nothing of the demo may be left running."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console


class DemoError(RuntimeError):
    """A part of the demo did not start or died; the message says which and where its
    log is."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[str]
    log: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    nice: int = 0
    restarts_left: int = 0


class Children:
    """The demo's child processes: started in sessions of their own (Ctrl-C reaches only
    the demo, which stops them in order), stopped in reverse order, SIGKILL as last resort."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env = work, env
        self.all: list[Child] = []
        # parts that died and were started again: what the summary reports
        self.restarted: list[dict[str, Any]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              stdout_pipe: bool = False, module: str = "loadcast", nice: int = 0,
              restarts: int = 0) -> Child:
        """Start ``python -m module *args`` with its output in ``{name}.log``; ``nice``
        above 0 for parts off the request path, which may lag (the sink, the page);
        ``restarts``: how many times :meth:`check` starts it again if it dies, as a
        service manager would (only for parts that resume where they stopped)."""
        if restarts and stdout_pipe:  # a new process's stdout would go to its log, unread
            raise ValueError(f"{name}: a part read through its stdout cannot be restarted")
        log = self.work / f"{name}.log"
        argv = [sys.executable, "-m", module, *args]
        c = Child(name, self._spawn(argv, log, env or {}, nice, stdout_pipe), log, argv,
                  env or {}, nice, restarts)
        self.all.append(c)
        return c

    def _spawn(self, argv: list[str], log: Path, env: dict[str, str], nice: int,
               stdout_pipe: bool = False) -> subprocess.Popen[str]:
        f = log.open("ab")
        proc = subprocess.Popen(
            argv, cwd=self.work, env={**self.env, **env}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else f, stderr=f, text=True,
            start_new_session=True)
        f.close()
        if nice:
            with contextlib.suppress(OSError):  # it may be gone already: check() says so
                os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
        return proc

    def line(self, c: Child, timeout: float) -> str:
        """The next stdout line of ``c`` (DemoError when it does not come)."""
        out: list[str] = []
        assert c.proc.stdout is not None
        stream = c.proc.stdout
        t = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not out or not out[0].strip():
            raise DemoError(f"{c.name} did not start: see {c.log}")
        return out[0].strip()

    def check(self) -> None:
        """DemoError when a part died, unless it may be started again (then it is, and
        :attr:`restarted` says when and why)."""
        for c in self.all:
            code = c.proc.poll()
            if code is None:
                continue
            if c.restarts_left <= 0:
                raise DemoError(f"{c.name} exited with {code}: see {c.log}")
            c.restarts_left -= 1
            with c.log.open("a") as f:
                f.write(f"--- loadcast demo: {c.name} exited with {code}; started again\n")
            c.proc = self._spawn(c.argv, c.log, c.env, c.nice)
            self.restarted.append({"part": c.name, "exit_code": code, "at": time.time(),
                                   "log": str(c.log)})

    def stop(self, c: Child, timeout: float = 20.0) -> None:
        if c.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait(5)
        if c.proc.stdout is not None:
            c.proc.stdout.close()

    def stop_all(self) -> None:
        for c in reversed(self.all):
            self.stop(c)


def http_json(url: str, timeout: float = 1.0, token: str = "") -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # loopback only
        return json.loads(r.read())


def wait_for(cond: Any, timeout: float, what: str, children: Children,
          stop: threading.Event) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop.is_set():
            raise KeyboardInterrupt
        try:
            v = cond()
        except OSError:
            v = None
        if v:
            return v
        children.check()
        time.sleep(0.3)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")



def leftovers(out_dir: Path, ports: list[int]) -> list[str]:
    """Processes that still name the demo's directory or hold one of its ports."""
    me = os.getpid()
    mine = {me, *(p.pid for p in psutil.Process(me).parents())}  # e.g. `timeout`, make
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            if p.pid in mine or p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info.get("cmdline") or [])
            cwd = p.info.get("cwd") or ""
            if str(out_dir) in cmd or cwd.startswith(str(out_dir)):
                left.append(f"{p.pid} {cmd[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    with contextlib.suppress(psutil.AccessDenied):
        for c in psutil.net_connections("tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in ports and c.pid \
                    and c.pid not in mine:
                left.append(f"{c.pid} listening on {c.laddr.port}")
    return left


def kill_leftovers(out_dir: Path, ports: list[int], console: Console) -> int:
    """Kill what :func:`leftovers` finds (saying so); the number of them."""
    left = leftovers(out_dir, ports)
    if left:
        for item in left:
            with contextlib.suppress(psutil.Error, ValueError):
                psutil.Process(int(item.split()[0])).kill()
        console.print(f"[red]killed {len(left)} leftover process(es):[/red] {left}")
    else:
        console.print("everything stopped: no process of the demo is left")
    return len(left)
