"""The API processes of one executor: started from a bundle's manifest (a session of
their own, log in ``<work_dir>/logs/``) and reported READY once healthy, adopted after a
restart, replaced when they die, drained and stopped (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import Gauge

from streams.bundles import BundleError, Manifest
from streams.executor.fetch import BundleCache
from streams.executor.report import Reporter
from streams.executor.state import STATE_FILE, ExecutorState, Instance

log = logging.getLogger(__name__)

INSTANCES = Gauge("loadcast_executor_instances", "API instances running", ["executor", "api"])


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def alive(inst: Instance) -> bool:
    try:
        p = psutil.Process(inst.pid)
        return abs(p.create_time() - inst.create_time) < 0.05 and \
            p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # instances are local


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with _DIRECT.open(url, timeout=timeout) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def kill(inst: Instance) -> None:
    """Stop an instance's process group: SIGTERM, 10 s, then SIGKILL."""
    if not alive(inst):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(inst.pid, signal.SIGTERM)  # its own session: the whole group
    try:
        psutil.Process(inst.pid).wait(10)
    except psutil.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(inst.pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            psutil.Process(inst.pid).wait(5)
    except psutil.Error:
        pass


@dataclass
class Supervisor:
    """Makes the instances in ``state`` match the accepted commands, and keeps them so.

    ``save`` writes the state file; ``stopping`` cuts a drain wait short; instances log
    to ``<work_dir>/logs/``."""

    state: ExecutorState
    save: Callable[[], None]
    bundles: BundleCache
    report: Reporter
    executor_id: str
    region: str
    work_dir: Path
    host: str
    drain_s: float
    stopping: threading.Event

    def adopt(self) -> None:
        """Keep the recorded instances that still run and answer their health check
        (re-announced READY); stop the others."""
        for api, insts in list(self.state.instances.items()):
            kept = []
            for inst in insts:
                health = inst.url + self.bundles.health_path(inst.digest)
                if alive(inst) and healthy(health, 2.0):
                    kept.append(inst)
                    self.report.status(inst.api, inst.command_id, inst.sequence, "READY",
                                       url=inst.url, digest=inst.digest,
                                       capacity=inst.capacity_rps,
                                       reason="adopted after executor restart")
                else:
                    log.warning("instance %s of %s (pid %d) is gone or unhealthy", inst.url,
                                api, inst.pid)
                    kill(inst)
            self.state.instances[api] = kept
        self.save()

    def reconcile(self, api: str) -> None:
        """Make what runs for ``api`` match its last accepted command."""
        cmd = self.state.accepted.get(api)
        if cmd is None:
            return
        insts = [i for i in self.state.instances.get(api, []) if alive(i)]
        self.state.instances[api] = insts
        want = int(cmd["desired_instances"]) if cmd["action"] == "ACTIVATE" else 0
        digest = str(cmd["bundle_digest"])
        current = [i for i in insts if i.digest == digest] if want else []
        stale = [i for i in insts if i not in current]
        for _ in range(max(0, want - len(current))):
            inst = self.start_instance(api, cmd)
            if inst is None:
                break
            current.append(inst)
        extra = current[want:]
        for inst in [*stale, *extra]:
            self.retire(inst, cmd)
        INSTANCES.labels(self.executor_id, api).set(len(self.state.instances.get(api, [])))

    def check_instances(self, api: str) -> None:
        """An instance whose process died is reported FAILED and replaced."""
        insts = self.state.instances.get(api, [])
        dead = [i for i in insts if not alive(i)]
        if not dead:
            return
        for inst in dead:
            self.report.status(api, inst.command_id, inst.sequence, "FAILED", url=inst.url,
                               digest=inst.digest, reason=f"process {inst.pid} exited")
        self.state.instances[api] = [i for i in insts if i not in dead]
        self.save()
        self.reconcile(api)

    def start_instance(self, api: str, cmd: Mapping[str, Any]) -> Instance | None:
        """Start one instance of the command's bundle and wait for its health check;
        None (a FAILED status said why) when it does not come up."""
        digest, cid, seq = str(cmd["bundle_digest"]), str(cmd["command_id"]), int(cmd["sequence"])
        try:
            manifest = self.bundles.prepared(digest)
        except BundleError as e:
            self.report.status(api, cid, seq, "FAILED", digest=digest, reason=str(e))
            return None
        port = free_port(self.host)
        url = f"http://{self.host}:{port}"
        logs = self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        logfile = logs / f"{api}-{port}.log"
        self.report.status(api, cid, seq, "STARTING", url=url, digest=digest,
                           capacity=manifest.capacity_rps)
        argv = [sys.executable if a == "{python}" else a.replace("{port}", str(port))
                for a in manifest.command]
        try:
            proc = self._spawn(api, digest, manifest, argv, port, logfile)
        except OSError as e:
            self.report.status(api, cid, seq, "FAILED", url=url, digest=digest,
                               reason=f"cannot start {argv[0]}: {e.strerror}")
            return None
        inst = Instance(api, digest, port, proc.pid, psutil.Process(proc.pid).create_time(),
                        url, cid, seq, manifest.capacity_rps)
        # In the state file before the health wait: a crash now still knows the pid.
        self.state.instances.setdefault(api, []).append(inst)
        self.save()
        failure = self._await_health(proc, url + manifest.health_path,
                                     manifest.startup_timeout_s)
        if failure is None:
            self.report.status(api, cid, seq, "READY", url=url, digest=digest,
                               capacity=manifest.capacity_rps)
            log.info("%s ready at %s (pid %d)", api, url, proc.pid)
            return inst
        tail = logfile.read_text(errors="replace")[-500:] if logfile.exists() else ""
        self.report.status(api, cid, seq, "FAILED", url=url, digest=digest,
                           reason=f"{failure}; log: {tail.strip()[-300:]}")
        kill(inst)
        self.state.instances[api].remove(inst)
        self.save()
        return None

    def _spawn(self, api: str, digest: str, manifest: Manifest, argv: list[str], port: int,
               logfile: Path) -> subprocess.Popen[bytes]:
        env = {**os.environ, **manifest.env, manifest.port_env: str(port),
               "LOADCAST_INSTANCE": f"{api}@{self.region}:{port}"}
        with logfile.open("ab") as out:
            return subprocess.Popen(argv, cwd=self.bundles.directory(digest), env=env,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    @staticmethod
    def _await_health(proc: subprocess.Popen[bytes], health: str,
                      timeout_s: float) -> str | None:
        """None once ``health`` answers 200 within ``timeout_s``; else why not."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if healthy(health, 0.5):
                return None
            time.sleep(0.05)
        code = proc.poll()
        return (f"exited with {code} before its health check passed" if code is not None
                else f"{health} not healthy within {timeout_s:g} s")

    def retire(self, inst: Instance, cmd: Mapping[str, Any]) -> None:
        """DRAINING, the drain wait, stop, RETIRED."""
        cid, seq = str(cmd["command_id"]), int(cmd["sequence"])
        self.report.status(inst.api, cid, seq, "DRAINING", url=inst.url, digest=inst.digest,
                           reason=f"stopping in {self.drain_s:g} s")
        self.report.flush(5)  # sidecars must hear of it before the drain wait
        self.stopping.wait(self.drain_s)
        kill(inst)
        insts = self.state.instances.get(inst.api, [])
        if inst in insts:
            insts.remove(inst)
        self.save()
        self.report.status(inst.api, cid, seq, "RETIRED", url=inst.url, digest=inst.digest)
        log.info("%s instance %s retired", inst.api, inst.url)

    def stop_all(self) -> None:
        """Stop every instance at once (no drain) and forget them."""
        for insts in self.state.instances.values():
            for inst in insts:
                kill(inst)
        self.state.instances = {}
        self.save()


def running_pids(work_dir: Path | str) -> list[int]:
    """Pids of the live instances recorded in an executor's state file (for tools and
    tests that must clean up after a killed executor)."""
    state = ExecutorState.load(Path(work_dir) / STATE_FILE)
    return [i.pid for insts in state.instances.values() for i in insts if alive(i)]


def kill_recorded(work_dir: Path | str) -> int:
    """SIGKILL every live instance recorded in an executor's state file; how many."""
    state = ExecutorState.load(Path(work_dir) / STATE_FILE)
    n = 0
    for insts in state.instances.values():
        for inst in insts:
            if alive(inst):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(inst.pid, signal.SIGKILL)
                n += 1
    return n
